"""Benchmarks: scripts that print tables (run them as ``sudo .venv/bin/python bench/NAME.py``)."""
