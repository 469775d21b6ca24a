"""Log reports: what the platform did in a window, built from the system log (docs/operations.md#reports)."""
