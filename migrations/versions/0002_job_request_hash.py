"""Bind an Idempotency-Key to the request it came with: jobs.request_hash.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 13:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('request_hash', sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'request_hash')
