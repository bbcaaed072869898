"""Benchmarks of stpp_ray: `python -m bench.run` (see BENCHMARKS.md)."""
