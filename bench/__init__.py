"""Benchmarks (run as scripts: python bench/NAME.py); shapes.py is shared by them."""
