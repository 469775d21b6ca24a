"""Alerting: threshold alerts delivered by webhook, email, SMS and live push."""
