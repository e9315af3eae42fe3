"""The ways other systems get a model into a server, run as `python -m bench.baselines.NAME` by the benchmarks."""
