"""The application: the ``hardneg`` CLI and its commands (train, prep, eval, runs, launch/status/stop), the demo,
reproduce and the benchmarks.

It is the only part of the project that wires the training core (the rest of pipeline/) to cluster/ and to
data_prep/'s writers; nothing outside pipeline/app imports it (tests/test_boundaries.py).
"""
