"""The exchange registry: one module per venue in this package, each declaring a module-level ``VENUE``.

A venue module says everything about its exchange in one place (ccxt id and market-loading profile, symbol
aliases, documented rate limit, and its websocket dialect where it has one); the REST poller
(services/ingest/rest.py) and the websocket runner (services/ingest/ws.py) know no exchange by name. Adding an
exchange is adding a module here (see README "Adding an exchange"); any other ccxt exchange id still works
through ccxt's defaults, REST only."""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.ingest.exchanges.base import Venue

# Modules of this package that are the venues' vocabulary, not venues.
_NOT_VENUES = frozenset({"base"})


@cache
def venues() -> dict[str, Venue]:
    """Every venue module of this package by source name, found on first use (nothing is loaded at import)."""
    from services.ingest.exchanges.base import Venue

    found: dict[str, Venue] = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name.startswith("_") or module_info.name in _NOT_VENUES:
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        venue = getattr(module, "VENUE", None)
        if not isinstance(venue, Venue):
            raise TypeError(f"{module.__name__} declares no VENUE (a services.ingest.exchanges.base.Venue)")
        if venue.name in found:
            raise ValueError(f"two venue modules declare {venue.name!r}")
        found[venue.name] = venue
    return found


def venue_for(name: str) -> Venue | None:
    return venues().get(name)


@cache
def symbol_aliases() -> dict[str, str]:
    """Exchange codes ccxt may leave as sent, mapped to ours: every venue's aliases, applied to every source
    (a code like XBT means bitcoin whichever exchange sends it)."""
    merged: dict[str, str] = {}
    for venue in venues().values():
        merged.update(venue.symbol_aliases)
    return merged


def our_symbol(code: str) -> str:
    upper = code.upper()
    return symbol_aliases().get(upper, upper)
