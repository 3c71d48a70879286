"""Benchmarks of the horde: see docs/benchmarks.md."""
