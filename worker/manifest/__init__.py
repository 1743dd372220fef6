"""Manifest step: a JSONL manifest read once into validated groups, or problems naming
file:line:field.

`source.scan` reads the file or pipe once, judging each line by the rules in `validate`
(and `duplicates`), into the private spool (`spool`) that `spool.read` streams to the plan.
`line_names` says which Names an invalid line could mean; `remembered` keeps a run's spool
for the next scan of the very same bytes. `values` holds the types and limits they share.
"""
