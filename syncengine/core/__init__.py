"""The sans-I/O core shared by the terminal SDK and the sync server.

Nothing in this package performs I/O or reads a clock: time, identifiers and randomness
are passed in by the caller. ``tests/core/test_purity.py`` enforces it.
"""
