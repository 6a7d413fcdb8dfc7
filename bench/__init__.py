"""Benchmarks, each a script (`python -m bench.NAME`); `python -m bench` runs them all."""
