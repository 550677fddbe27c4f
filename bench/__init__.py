"""Benchmarks: scripts that print figures (run as ``python bench/bench.py``), not tests."""
