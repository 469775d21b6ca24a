"""alerting: when each delivery is next attempted and when it was delivered; the index the stalled-delivery
sweep reads.

Revision ID: 0010
Revises: 0009
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("alert_deliveries", sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("alert_deliveries", sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_alert_deliveries_unfinished",
        "alert_deliveries",
        ["updated_at"],
        postgresql_where=sa.text("status IN ('pending', 'retrying')"),
    )


def downgrade() -> None:
    op.drop_index("ix_alert_deliveries_unfinished", table_name="alert_deliveries")
    op.drop_column("alert_deliveries", "delivered_at")
    op.drop_column("alert_deliveries", "next_attempt_at")
