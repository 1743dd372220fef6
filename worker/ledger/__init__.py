"""Ledger step: the append-only journal of every run against one target (journal), its
record types (records), its locks (lock) and its derived on-disk index (index)."""
