"""Real data as jobs: an `ingest` job kind whose job names the dataset it made
(`jobs.dataset_id`), and each dataset's ingest record (`datasets.ingest`: the image
transform its items went through, so a query image is decoded the same way; the reader's
report of unreadable items; the options it was read with). Datasets of 8-bit images are
stored as uint8 (`datasets.dtype`), which needs no schema change.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('datasets', sa.Column('ingest', postgresql.JSONB(), nullable=True))
    op.add_column('jobs', sa.Column('dataset_id', sa.BigInteger(), nullable=True))
    op.create_foreign_key(op.f('fk_jobs_dataset_id_datasets'), 'jobs', 'datasets',
                          ['dataset_id'], ['id'], ondelete='SET NULL')
    op.create_index(op.f('ix_jobs_dataset_id'), 'jobs', ['dataset_id'])
    op.drop_constraint(op.f('ck_jobs_kind_valid'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_kind_valid'), 'jobs',
                               "kind IN ('train', 'embed', 'ingest')")


def downgrade() -> None:
    op.execute("DELETE FROM jobs WHERE kind = 'ingest'")
    op.drop_constraint(op.f('ck_jobs_kind_valid'), 'jobs', type_='check')
    op.create_check_constraint(op.f('ck_jobs_kind_valid'), 'jobs',
                               "kind IN ('train', 'embed')")
    op.drop_index(op.f('ix_jobs_dataset_id'), table_name='jobs')
    op.drop_constraint(op.f('fk_jobs_dataset_id_datasets'), 'jobs', type_='foreignkey')
    op.drop_column('jobs', 'dataset_id')
    op.drop_column('datasets', 'ingest')
