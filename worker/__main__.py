"""`python -m worker`: the same as the `worker` command."""

from worker.cli import main

main()
