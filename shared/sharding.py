"""Partitioning coins over replicas of a stateful consumer (pricing, alerting).

A coin's shard is a stable hash of its symbol, so every process (ingest routing ticks, pricing and alerting
replicas choosing what they own) agrees on it without talking to the others, across restarts, Python versions
and machines. Python's ``hash()`` is salted per process and would not do. docs/scaling.md describes the scheme
and how to change a shard count.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from shared.streams import TICKS_STREAM

# The ordinal a Kubernetes StatefulSet gives its pods ("pricing-0", "pricing-1", ...): digits after the last dash.
_ORDINAL = re.compile(r"-(\d+)$")


def shard_of(symbol: str, shards: int) -> int:
    """The shard (0 .. shards-1) that owns ``symbol``, whatever its case."""
    if shards < 1:
        raise ValueError(f"shards must be at least 1, not {shards}")
    if shards == 1:
        return 0
    digest = hashlib.blake2b(symbol.upper().encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards


def owned(symbols: Iterable[str], shard: int, shards: int) -> list[str]:
    """Those of ``symbols`` that ``shard`` of ``shards`` owns, in their given order."""
    return [s for s in symbols if shard_of(s, shards) == shard]


def ticks_stream(shard: int, shards: int) -> str:
    """The ticks stream of one pricing shard: the plain ``ticks`` while there is one shard (existing installs
    keep their stream and its backlog), ``ticks.<shard>`` when there are more."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    return TICKS_STREAM if shards == 1 else f"{TICKS_STREAM}.{shard}"


def ticks_streams(shards: int) -> list[str]:
    """Every pricing shard's ticks stream: what a reader of all ticks (a readiness or drain check) follows."""
    return [ticks_stream(i, shards) for i in range(shards)]


def tick_stream_of(symbol: str, shards: int) -> str:
    """Where ingest publishes a tick of ``symbol`` (its base coin)."""
    return ticks_stream(shard_of(symbol, shards), shards)


def hostname_ordinal(hostname: str) -> int | None:
    """The trailing ``-<n>`` of a StatefulSet pod's hostname, or None when it has none."""
    match = _ORDINAL.search(hostname.strip())
    return int(match.group(1)) if match else None
