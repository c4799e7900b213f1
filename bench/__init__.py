"""Benchmarks: Keel beside its peers, and Keel's own overhead one way of running it at a time
(`make bench`, `python -m bench.compare`; see docs/benchmarks.md)."""
