"""Consolidation method strings outgrew 40 characters (e.g. stablecoin parity restated through ECB rates).

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("prices", "method", type_=sa.String(length=120), existing_nullable=False)


def downgrade() -> None:
    op.alter_column("prices", "method", type_=sa.String(length=40), existing_nullable=False)
