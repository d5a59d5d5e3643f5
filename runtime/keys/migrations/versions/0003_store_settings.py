"""The store's own settings: a check value of its hashing secret, so a wrong secret is refused at start.

Without it, a process given another `HOKUSAI_MTLS_KEY_HASH_SECRET` than the one the keys were hashed
with starts, lists keys, creates new ones, and refuses every existing key as invalid; with it, it
stops at once naming the variable (`runtime.keys.opening`).

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_key_store_settings",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(255), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("api_key_store_settings")
