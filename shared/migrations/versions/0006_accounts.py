"""accounts and gateway security: roles limited to user/admin; activity read newest-first per user.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: Sequence[str] | None = None
depends_on: Sequence[str] | None = None


def upgrade() -> None:
    op.create_check_constraint("role", "users", "role IN ('user', 'admin')")
    op.create_index("ix_user_activity_user_id_id", "user_activity", ["user_id", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_user_activity_user_id_id", table_name="user_activity")
    op.drop_constraint("ck_users_role", "users", type_="check")
