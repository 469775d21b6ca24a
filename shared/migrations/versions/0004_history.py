"""history (candles, retention): first/last point times on candles, backfill progress per interval.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    # When the first and last price of a live candle were seen: an out-of-order or replayed point can
    # then only move open/close if it is really earlier/later (null on candles loaded from exchanges).
    op.add_column("candles", sa.Column("first_ts", sa.DateTime(timezone=True), nullable=True))
    op.add_column("candles", sa.Column("last_ts", sa.DateTime(timezone=True), nullable=True))
    # Retention and roll-ups select by interval and time across all coins.
    op.create_index("ix_candles_interval_t", "candles", ["interval", "t"])
    op.add_column("backfill_progress", sa.Column("interval", sa.String(length=4), nullable=False, server_default="1d"))
    op.drop_constraint("pk_backfill_progress", "backfill_progress", type_="primary")
    op.create_primary_key("pk_backfill_progress", "backfill_progress", ["base", "vs", "source", "interval"])


def downgrade() -> None:
    op.drop_constraint("pk_backfill_progress", "backfill_progress", type_="primary")
    op.execute("DELETE FROM backfill_progress WHERE interval <> '1d'")
    op.create_primary_key("pk_backfill_progress", "backfill_progress", ["base", "vs", "source"])
    op.drop_column("backfill_progress", "interval")
    op.drop_index("ix_candles_interval_t", table_name="candles")
    op.drop_column("candles", "last_ts")
    op.drop_column("candles", "first_ts")
