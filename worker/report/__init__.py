"""`worker report`'s reading of a ledger: which manifest to count against and what the
ledger holds (gather), each line's status and the counts (status), what a sync adds
(sync_audit), and the text a terminal shows (render). The command is commands/report.py."""
