"""Fault scenarios against the real platform (``make reliability``); the harness is ``platform.py``."""
