"""Tandem's version. Every machine of a pool must run the same one: the host sends it in its Join (remote.py)."""

__version__ = "0.1.0"
