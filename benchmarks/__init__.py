"""VIST2 benchmarks (see README.md)."""
