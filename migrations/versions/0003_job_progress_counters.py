"""Progress counters as columns: jobs.items_done and jobs.items_total.

The embedding progress counter used to live as a `done_rows` key inside jobs.params; it
moves to a column (an atomic `items_done = items_done + n`), and the key is dropped.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 17:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('items_done', sa.BigInteger(), server_default='0',
                                    nullable=False))
    op.add_column('jobs', sa.Column('items_total', sa.BigInteger(), nullable=True))
    op.execute("UPDATE jobs SET items_done = COALESCE((params->>'done_rows')::bigint, 0), "
               "params = params - 'done_rows' WHERE params ? 'done_rows'")
    op.execute("UPDATE jobs SET items_total = (SELECT n_items FROM embedding_sets "
               "WHERE embedding_sets.id = jobs.embedding_set_id) WHERE kind = 'embed'")


def downgrade() -> None:
    op.execute("UPDATE jobs SET params = jsonb_set(params, '{done_rows}', "
               "to_jsonb(items_done)) WHERE kind = 'embed' AND items_done > 0")
    op.drop_column('jobs', 'items_total')
    op.drop_column('jobs', 'items_done')
