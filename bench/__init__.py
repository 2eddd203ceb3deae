"""Benchmarks (not tests): each prints one JSON line. See the README."""
