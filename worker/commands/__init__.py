"""The commands that talk to the account: `run`, `sync`, `export`, each composed from
worker/compose.py's pieces."""
