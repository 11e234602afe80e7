"""Benchmarks: `python -m benchmarks` (run.py) compares mlx-gemma3n with its peers; see README.md."""
