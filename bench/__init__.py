"""Benchmarks: what durability costs (`python -m bench.overhead`)."""
