"""The words of `worker --help`: each command's description, examples and exit codes."""

from __future__ import annotations

import textwrap

SENDING = ("run", "sync", "export")  # the commands whose options are options.OPTIONS

COMMANDS = {
    "run": "create every manifest group the ledger does not record as done",
    "sync": "make the account match the manifest: create, update, and with --prune delete, "
    "planned from what the account holds",
    "export": "write the account's groups as a manifest",
    "validate": "check a manifest; send nothing",
    "report": "what a ledger says: counts, runs, what is not done",
    "sandbox": "run the local Live API in the foreground",
}


EXIT_CODES = {
    "run": "0 every group is done; 1 rejected or invalid lines; 2 nothing was sent (usage, job "
    "file, manifest, credentials, ledger); 3 run again later (deferred, endpoint or limiter "
    "unreachable); 4 interrupted (resumable); 5 the ledger is locked by another run; 7 stopped: "
    "the server refused the run or the ledger failed mid-run; 70 internal error.",
    "sync": "0 the account matches the manifest; 1 rejected, invalid or conflicting items; 2 "
    "nothing was sent (usage, job file, manifest, credentials, ledger, plan refused); 3 run "
    "again later (deferred, listing incomplete, endpoint or limiter unreachable); 4 interrupted "
    "(resumable); 5 the ledger is locked; 6 drift (--check); 7 stopped; 70 internal error.",
    "export": "0 written; 2 usage or credentials; 3 run again later (listing incomplete, "
    "endpoint unreachable); 4 interrupted; 7 the server refused; 70 internal error.",
    "validate": "0 no problems; 2 the manifest has problems (each printed as FILE:LINE: FIELD: "
    "reason) or cannot be read; 70 internal error.",
    "report": "0 the report was printed; 2 the ledger cannot be read; 70 internal error.",
}
EXAMPLES = {
    "run": "worker run groups.jsonl --rate 10\n  worker run --job nightly.toml",
    "sync": "worker sync groups.jsonl --dry-run\n  worker sync groups.jsonl --prune "
    "--scope-project live --max-delete 20\n  worker sync groups.jsonl --check --json",
    "export": "worker export -o groups.jsonl --project live",
    "validate": "worker validate groups.jsonl",
    "report": "worker report groups.ledger.jsonl --failed > retry.jsonl",
}
ENVIRONMENT = """\
environment: every option above also reads WORKER_<NAME> (WORKER_RATE, WORKER_ENDPOINT,
WORKER_SCOPE_PROJECT=a,b, ...); the command line wins over a job file, which wins over the
environment. Credentials: VOLCENGINE_ACCESS_KEY / VOLCENGINE_SECRET_KEY /
VOLCENGINE_SESSION_TOKEN or VOLC_ACCESSKEY / VOLC_SECRETKEY / VOLC_SESSION_TOKEN, a `ve`
profile (--profile), ~/.volc/credentials, ~/.volc/config. See docs/configuration.md."""


def epilog(name: str) -> str | None:
    """`name`'s examples, its own exit codes and, for the sending commands, the environment."""
    if name not in EXIT_CODES:
        return None
    parts = [f"examples:\n  {EXAMPLES[name]}", textwrap.fill(f"exit codes: {EXIT_CODES[name]}")]
    if name in SENDING:
        parts.append(ENVIRONMENT)
    return "\n\n".join(parts)
