"""Reproducible benchmarks: each runs as `python -m bench.NAME` from the repository root and writes its results into
BENCHMARKS.md (and bench/results/). They share tests.kit with the tests, and bench.serverproc among themselves."""
