"""Benchmarks (`python -m bench.<name>`: they print figures, they are not tests). The sandbox
process harness they share with the tests is worker.sandbox.process."""
