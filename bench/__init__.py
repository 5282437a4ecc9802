"""Benchmarks for sqlproxy (not part of the installed package)."""
