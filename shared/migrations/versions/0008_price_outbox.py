"""pricing: the price-event outbox, written in the consolidation transaction and relayed to the stream;
each price's ``fresh_until``, so reads can re-check freshness.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("prices", sa.Column("fresh_until", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "price_outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_price_outbox")),
        sa.UniqueConstraint("event_id", name=op.f("uq_price_outbox_event_id")),
    )


def downgrade() -> None:
    op.drop_table("price_outbox")
    op.drop_column("prices", "fresh_until")
