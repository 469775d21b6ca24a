"""Price history: 1-minute candles from consolidated prices, coarser views, retention, exchange backfill."""
