"""Ingest: collects quotes from exchanges (through ccxt) and publishes normalised ticks."""
