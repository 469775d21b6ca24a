"""CoinGecko market data (market cap, supply, names) refreshed by a scheduled arq job.

Rate budget (free "Demo"/public tier: about 30 calls a minute, 10,000 calls a month, and every
call counts, failed ones included): one run every ``REFRESH_MINUTES`` (10) makes one
``/coins/markets`` call per 250 tracked coins, plus at most one symbol lookup for coins whose
CoinGecko id is not known yet (ids learned once are stored, and a symbol CoinGecko does not know
is not asked for again for a day). With the default ten coins that is 144 calls a day, about 4,500
a month, under half the monthly cap; calls inside one run are spaced at least two seconds apart.
A 429 stops the run and no call is made before its Retry-After has passed (or, without one, an
exponential backoff with jitter from one minute up to an hour), across restarts and replicas since
the deadline is kept in Redis.
"""
