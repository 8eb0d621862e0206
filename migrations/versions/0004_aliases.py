"""Aliases for models and embedding sets, and their history.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 11:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

PATTERN = r"^[a-z][a-z0-9_.-]{0,62}$"


def upgrade() -> None:
    op.create_table(
        'aliases',
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('model_id', sa.BigInteger(), nullable=True),
        sa.Column('embedding_set_id', sa.BigInteger(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.CheckConstraint('(model_id IS NULL) <> (embedding_set_id IS NULL)',
                           name=op.f('ck_aliases_one_target')),
        sa.CheckConstraint(f"name ~ '{PATTERN}'", name=op.f('ck_aliases_name_valid')),
        sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='RESTRICT',
                                name=op.f('fk_aliases_model_id_models')),
        sa.ForeignKeyConstraint(['embedding_set_id'], ['embedding_sets.id'],
                                ondelete='RESTRICT',
                                name=op.f('fk_aliases_embedding_set_id_embedding_sets')),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_aliases')),
    )
    op.create_index(op.f('ix_aliases_model_id'), 'aliases', ['model_id'])
    op.create_index(op.f('ix_aliases_embedding_set_id'), 'aliases', ['embedding_set_id'])
    op.create_table(
        'alias_events',
        sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('action', sa.Text(), nullable=False),
        sa.Column('kind', sa.Text(), nullable=False),
        sa.Column('target_id', sa.BigInteger(), nullable=True),
        sa.Column('previous_id', sa.BigInteger(), nullable=True),
        sa.Column('key_id', sa.BigInteger(), nullable=True),
        sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.CheckConstraint("action IN ('created', 'moved', 'deleted')",
                           name=op.f('ck_alias_events_action_valid')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_events')),
    )
    op.create_index('ix_alias_events_name_id', 'alias_events', ['name', 'id'])


def downgrade() -> None:
    op.drop_table('alias_events')
    op.drop_table('aliases')
