"""Analytics: comparisons, statistics and charts."""
