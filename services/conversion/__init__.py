"""Conversion: crypto and fiat conversions, now and in the past."""
