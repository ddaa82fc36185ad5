"""quantload's benchmark suite: `python -m bench` from the repository root (see bench/run.py).

Every measurement runs in a fresh process (bench/worker.py); speed is reported as a ratio against the
alternative measured in the same run, the median of several runs.
"""
