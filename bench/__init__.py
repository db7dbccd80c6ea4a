"""Benchmarks: each module measures the project beside its baseline in one run and prints the ratio."""
