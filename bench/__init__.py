"""Benchmarks of jmceln_jax (run as `python -m bench.<name>`)."""
