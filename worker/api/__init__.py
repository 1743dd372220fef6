"""The Live API as the worker sees it: the contract, the signer, the wire, the verdicts.

spec         the contract: endpoint, actions, error codes, Name and tag rules (no I/O)
signing      Volcengine V4: (request, credentials, now) -> headers; the sandbox's verify
transport    the only aiohttp importer: send(signed) -> Response | Failure
classify     pure: Response | Failure -> a Verdict (Succeeded ... Abort), the code table
account      the List paging as a state machine fed pages (Listing), and its Listed rows
credentials  where the keys come from: environment, files, profiles
"""
