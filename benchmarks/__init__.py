"""Benchmarks of deepclust: the method harness (run.py) and component timings (components.py)."""
