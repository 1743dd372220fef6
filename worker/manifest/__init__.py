"""Manifest step: a JSONL manifest read once into validated groups, or problems naming
file:line:field."""
