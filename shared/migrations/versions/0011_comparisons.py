"""analytics: users' saved comparisons.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "comparisons",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("symbols", postgresql.ARRAY(sa.String(length=15)), nullable=False),
        sa.Column("vs", sa.String(length=15), nullable=False),
        sa.Column("period", sa.String(length=10), nullable=True),
        sa.Column("start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("interval", sa.String(length=4), server_default="auto", nullable=False),
        sa.Column("benchmark", sa.String(length=15), nullable=True),
        sa.Column("risk_free_rate", sa.Numeric(), server_default="0", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_comparisons_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_comparisons")),
    )
    op.create_index(op.f("ix_comparisons_user_id"), "comparisons", ["user_id"])
    op.create_index("uq_comparisons_user_id_name", "comparisons", ["user_id", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("uq_comparisons_user_id_name", table_name="comparisons")
    op.drop_index(op.f("ix_comparisons_user_id"), table_name="comparisons")
    op.drop_table("comparisons")
