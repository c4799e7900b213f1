"""Benchmarks: Keel beside its peers (`make bench`, `python -m bench.compare`) and Keel's own
overhead against a plain loop (`python -m bench.overhead`)."""
