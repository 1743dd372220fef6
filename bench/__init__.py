"""Benchmarks (`python -m bench.<name>`: they print figures, they are not tests) and the
harness they share with the tests."""
