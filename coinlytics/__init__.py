"""The ``coinlytics`` command and the launcher of the platform's processes.

This package sits above ``services`` and ``shared``: it may import both, and neither imports it.
"""
