"""An embedding set's index build as it runs and as it ended (`index_build`, JSONB): the
phase and tuples loaded (from `pg_stat_progress_create_index`, polled while the build
runs), the parallel workers and memory it was given, the memory its graph needed, and
whether the graph fitted in memory (pgvector says when it did not). Sets built before
this have none; nothing else changes, no view changes.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('embedding_sets', sa.Column('index_build', JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column('embedding_sets', 'index_build')
