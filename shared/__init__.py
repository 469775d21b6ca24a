"""Coinlytics common package: settings, database, streams, logging, errors shared by every service."""
