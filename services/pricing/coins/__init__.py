"""Tracked coins: overview, detail and admin changes (market cap from CoinGecko, changes from our candles)."""
