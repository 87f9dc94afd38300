"""Benchmarks: each measurement of the product side by side with its floor (see bench/README.md).

Scripts, not part of the installed packages: run ``.venv/bin/python bench/run.py``.
"""
