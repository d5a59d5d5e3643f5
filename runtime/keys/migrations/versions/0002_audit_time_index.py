"""The audit's time index: every API instance asks "which keys changed since" twice a second.

`runtime.auth.key_changes` polls `api_key_audit` for revocations and rotations newer than the last
one it saw, so that a revoked key is refused on every instance within a second, not after the
cache's five minutes; that is a range scan on `at` alone.

Revision ID: 0002
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_api_key_audit_time", "api_key_audit", ["at"])


def downgrade() -> None:
    op.drop_index("ix_api_key_audit_time", table_name="api_key_audit")
