"""Plan step: what to do, decided from the manifest and what is known, before anything is
sent. Pure: `run_plan` (run: one manifest line against the ledger's latest word),
`reconcile` (sync: the manifest against the listed account), `rounds` (sync: what the
listings and writes of one invocation say across its rounds), `export` (the listed
account as a manifest)."""
