"""Run step: carry out a stream of writes under one rate budget, retried, and record each one.

dispatch (Runner: one TaskGroup), concurrency (the in-flight limit), controls (stopping),
tally (live counts), retry (what to do after one verdict). Import the submodules.
"""
