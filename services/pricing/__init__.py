"""Pricing: consumes ticks, stores them, and consolidates one trustworthy price per coin."""
