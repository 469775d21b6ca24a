"""A CoinGecko-compatible API under /api/v3: CoinGecko's paths, parameters and field names over our own
services' numbers, so clients written for CoinGecko (pycoingecko, coingecko-sdk, bots, spreadsheets) work
against a self-hosted Coinlytics by changing only their base URL."""
