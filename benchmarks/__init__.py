"""Benchmarks that report numbers (never timed tests): `python -m benchmarks.<name>`."""
