"""Embedding sets that grow: `embedding_set_parts` (the datasets a set holds and where),
and on each latent row the item it codes (`dataset_id`, `dataset_index`).

Existing sets become one part (their own dataset at position 0); their rows get
`dataset_id` = the set's dataset and `dataset_index` = `item_index` (a rewrite of the
latents table: plan for its time on a large database). The view lb_v1.latents keeps its
columns; its `dataset_id` is now the item's dataset.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 12:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

LATENTS_VIEW = """
    CREATE OR REPLACE VIEW lb_v1.latents AS
    SELECT l.set_id, e.model_id, {dataset} AS dataset_id, i.key, l.item_index, i.label,
           i.metadata, l.mu, l.logvar, l.elbo, l.reconstruction, l.kl, l.log_px,
           e.importance_samples
    FROM public.latents l
    JOIN public.embedding_sets e ON e.id = l.set_id AND e.status = 'ready'
    JOIN public.items i ON {join}"""


def upgrade() -> None:
    op.create_table(
        'embedding_set_parts',
        sa.Column('set_id', sa.BigInteger(), nullable=False),
        sa.Column('dataset_id', sa.BigInteger(), nullable=False),
        sa.Column('start', sa.BigInteger(), nullable=False),
        sa.Column('n_items', sa.BigInteger(), nullable=False),
        sa.Column('status', sa.Text(), server_default='writing', nullable=False),
        sa.Column('job_id', sa.BigInteger(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.CheckConstraint("status IN ('writing', 'ready')",
                           name=op.f('ck_embedding_set_parts_status_valid')),
        sa.ForeignKeyConstraint(['set_id'], ['embedding_sets.id'], ondelete='CASCADE',
                                name=op.f('fk_embedding_set_parts_set_id_embedding_sets')),
        sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], ondelete='CASCADE',
                                name=op.f('fk_embedding_set_parts_dataset_id_datasets')),
        sa.PrimaryKeyConstraint('set_id', 'dataset_id', name=op.f('pk_embedding_set_parts')),
    )
    op.execute("INSERT INTO embedding_set_parts (set_id, dataset_id, start, n_items, status) "
               "SELECT id, dataset_id, 0, n_items, 'ready' FROM embedding_sets")
    op.add_column('latents', sa.Column('dataset_id', sa.BigInteger(), nullable=True))
    op.add_column('latents', sa.Column('dataset_index', sa.BigInteger(), nullable=True))
    op.execute("UPDATE latents l SET dataset_id = e.dataset_id, dataset_index = l.item_index "
               "FROM embedding_sets e WHERE e.id = l.set_id")
    op.alter_column('latents', 'dataset_id', nullable=False)
    op.alter_column('latents', 'dataset_index', nullable=False)
    op.execute(LATENTS_VIEW.format(
        dataset="l.dataset_id", join="i.dataset_id = l.dataset_id AND i.index = l.dataset_index"))


def downgrade() -> None:
    op.execute(LATENTS_VIEW.format(
        dataset="e.dataset_id", join="i.dataset_id = e.dataset_id AND i.index = l.item_index"))
    op.execute("DELETE FROM latents l USING embedding_sets e WHERE e.id = l.set_id "
               "AND l.dataset_id <> e.dataset_id")  # appended items have no place before
    op.drop_column('latents', 'dataset_index')
    op.drop_column('latents', 'dataset_id')
    op.drop_table('embedding_set_parts')
