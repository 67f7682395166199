"""Deployments: variant weights set by promote, rollback and weight changes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deployment_weights",
        sa.Column("model", sa.String(length=256), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=256), nullable=True),
        sa.PrimaryKeyConstraint("model", "variant"),
    )


def downgrade() -> None:
    op.drop_table("deployment_weights")
