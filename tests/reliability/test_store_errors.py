"""Fast regression check for what the PostgreSQL outage scenario found (not a fault scenario: runs in ``make test``).

The embedded PostgreSQL of ``make run`` listens on a unix socket that disappears while the server is stopped;
connecting then raises a bare ``FileNotFoundError``. It was not recognised as "the database is unavailable", so
pricing's tick consumer counted each attempt against the entries' delivery budget and, after a 30 s outage,
dead-lettered ticks it should have waited to apply.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from shared.db import create_engine
from shared.errors import store_unavailable


async def test_a_missing_postgres_socket_is_the_database_being_unavailable():
    # A short directory of its own: under a long checkout path the test's tmp_path makes the socket path
    # longer than AF_UNIX allows, a different error than the missing socket this is about.
    short = tempfile.mkdtemp(prefix="cl-", dir="/tmp")
    url = f"postgresql://postgres@/coinlytics?host={short}/no-server-here"
    with pytest.raises(OSError) as direct:
        await asyncpg.connect(url)
    assert store_unavailable(direct.value) == "the database"
    engine = create_engine(url)
    try:
        with pytest.raises(OSError) as pooled:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
        Path(short).rmdir()
    assert store_unavailable(pooled.value) == "the database"


def test_a_missing_file_is_still_a_bug_not_an_outage(tmp_path):
    with pytest.raises(FileNotFoundError) as missing:
        (tmp_path / "absent.json").read_text()
    assert store_unavailable(missing.value) is None


def test_a_file_not_found_raised_by_our_own_code_is_a_bug_not_an_outage():
    # No errno and no filename: only the socket connect's ENOENT means the database is gone.
    assert store_unavailable(FileNotFoundError("no rule file for this coin")) is None
