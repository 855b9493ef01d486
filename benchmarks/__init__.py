"""Benchmarks against the reference implementations; `python -m benchmarks.suite` runs them all."""
