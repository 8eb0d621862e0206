"""Initial schema: datasets, items, models, jobs, training_metrics, embedding_sets,
latents (pgvector) and api_keys.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-24 03:15:58.194954
"""

from __future__ import annotations

import pgvector.sqlalchemy
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # pgvector's type must exist before the latents table; the extension is left in
    # place on downgrade (other schemas in the database may use it).
    op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table('api_keys',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('prefix', sa.Text(), nullable=False),
    sa.Column('key_hash', sa.Text(), nullable=False),
    sa.Column('scopes', postgresql.ARRAY(sa.Text()), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_index(op.f('ix_api_keys_prefix'), 'api_keys', ['prefix'], unique=False)
    op.create_table('datasets',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('item_shape', postgresql.ARRAY(sa.Integer()), nullable=False),
    sa.Column('dtype', sa.Text(), nullable=False),
    sa.Column('source_dtype', sa.Text(), nullable=False),
    sa.Column('source_format', sa.Text(), nullable=False),
    sa.Column('n_items', sa.BigInteger(), nullable=False),
    sa.Column('checksum', sa.Text(), nullable=False),
    sa.Column('source_uri', sa.Text(), nullable=True),
    sa.Column('artifact_key', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('min_value', sa.Double(), nullable=False),
    sa.Column('max_value', sa.Double(), nullable=False),
    sa.Column('has_labels', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets')),
    sa.UniqueConstraint('checksum', name=op.f('uq_datasets_checksum')),
    sa.UniqueConstraint('name', name=op.f('uq_datasets_name'))
    )
    op.create_table('items',
    sa.Column('dataset_id', sa.BigInteger(), nullable=False),
    sa.Column('index', sa.BigInteger(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.Column('label', sa.Text(), nullable=True),
    sa.Column('metadata', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_items_dataset_id_datasets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('dataset_id', 'index', name=op.f('pk_items')),
    sa.UniqueConstraint('dataset_id', 'key', name='uq_items_dataset_key')
    )
    op.create_table('models',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('dataset_id', sa.BigInteger(), nullable=False),
    sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('status', sa.Text(), server_default='pending', nullable=False),
    sa.Column('summary', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('checkpoint_uri', sa.Text(), nullable=True),
    sa.Column('encoder_uri', sa.Text(), nullable=True),
    sa.Column('decoder_uri', sa.Text(), nullable=True),
    sa.Column('encoder_sha256', sa.Text(), nullable=True),
    sa.Column('decoder_sha256', sa.Text(), nullable=True),
    sa.Column('sweep_id', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("status IN ('pending', 'training', 'ready', 'failed', 'cancelled')", name=op.f('ck_models_status_valid')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_models_dataset_id_datasets'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_models'))
    )
    op.create_index(op.f('ix_models_dataset_id'), 'models', ['dataset_id'], unique=False)
    op.create_index(op.f('ix_models_sweep_id'), 'models', ['sweep_id'], unique=False)
    op.create_table('embedding_sets',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('model_id', sa.BigInteger(), nullable=False),
    sa.Column('dataset_id', sa.BigInteger(), nullable=False),
    sa.Column('status', sa.Text(), server_default='pending', nullable=False),
    sa.Column('dim', sa.Integer(), nullable=False),
    sa.Column('n_items', sa.BigInteger(), nullable=False),
    sa.Column('importance_samples', sa.Integer(), server_default='0', nullable=False),
    sa.Column('index_status', sa.Text(), server_default='none', nullable=False),
    sa.Column('index_metric', sa.Text(), server_default='l2', nullable=False),
    sa.Column('hnsw_ef_search', sa.Integer(), nullable=True),
    sa.Column('stats', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('ready_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("index_metric IN ('l2', 'cosine')", name=op.f('ck_embedding_sets_index_metric_valid')),
    sa.CheckConstraint("index_status IN ('none', 'building', 'ready', 'skipped', 'failed')", name=op.f('ck_embedding_sets_index_status_valid')),
    sa.CheckConstraint("status IN ('pending', 'writing', 'finishing', 'ready', 'failed', 'cancelled')", name=op.f('ck_embedding_sets_status_valid')),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_embedding_sets_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_embedding_sets_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_embedding_sets'))
    )
    op.create_index(op.f('ix_embedding_sets_dataset_id'), 'embedding_sets', ['dataset_id'], unique=False)
    op.create_index(op.f('ix_embedding_sets_model_id'), 'embedding_sets', ['model_id'], unique=False)
    op.create_table('training_metrics',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('model_id', sa.BigInteger(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('split', sa.Text(), nullable=False),
    sa.Column('elbo', sa.Double(), nullable=False),
    sa.Column('reconstruction', sa.Double(), nullable=False),
    sa.Column('kl', sa.Double(), nullable=False),
    sa.Column('log_px', sa.Double(), nullable=True),
    sa.Column('importance_samples', sa.Integer(), server_default='0', nullable=False),
    sa.Column('loss', sa.Double(), nullable=True),
    sa.Column('beta', sa.Double(), nullable=False),
    sa.Column('lr', sa.Double(), nullable=False),
    sa.Column('active_units', sa.Integer(), nullable=True),
    sa.Column('seconds', sa.Double(), nullable=False),
    sa.CheckConstraint("split IN ('train', 'val', 'test')", name=op.f('ck_training_metrics_split_valid')),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_training_metrics_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_metrics')),
    sa.UniqueConstraint('model_id', 'epoch', 'split', name='uq_training_metrics_epoch_split')
    )
    op.create_table('jobs',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('kind', sa.Text(), nullable=False),
    sa.Column('status', sa.Text(), server_default='queued', nullable=False),
    sa.Column('progress', sa.Double(), server_default='0', nullable=False),
    sa.Column('progress_message', sa.Text(), nullable=True),
    sa.Column('eta_seconds', sa.Double(), nullable=True),
    sa.Column('params', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('max_attempts', sa.Integer(), server_default='3', nullable=False),
    sa.Column('idempotency_key', sa.Text(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), server_default='false', nullable=False),
    sa.Column('lease_owner', sa.Text(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('model_id', sa.BigInteger(), nullable=True),
    sa.Column('embedding_set_id', sa.BigInteger(), nullable=True),
    sa.Column('sweep_id', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("kind IN ('train', 'embed')", name=op.f('ck_jobs_kind_valid')),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name=op.f('ck_jobs_status_valid')),
    sa.ForeignKeyConstraint(['embedding_set_id'], ['embedding_sets.id'], name=op.f('fk_jobs_embedding_set_id_embedding_sets'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_jobs_model_id_models'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs')),
    sa.UniqueConstraint('idempotency_key', name=op.f('uq_jobs_idempotency_key'))
    )
    op.create_index(op.f('ix_jobs_embedding_set_id'), 'jobs', ['embedding_set_id'], unique=False)
    op.create_index(op.f('ix_jobs_model_id'), 'jobs', ['model_id'], unique=False)
    op.create_index('ix_jobs_status_created', 'jobs', ['status', 'created_at'], unique=False)
    op.create_index(op.f('ix_jobs_sweep_id'), 'jobs', ['sweep_id'], unique=False)
    op.create_table('latents',
    sa.Column('set_id', sa.BigInteger(), nullable=False),
    sa.Column('item_index', sa.BigInteger(), nullable=False),
    sa.Column('mu', pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
    sa.Column('logvar', pgvector.sqlalchemy.vector.VECTOR(), nullable=False),
    sa.Column('elbo', sa.Double(), nullable=False),
    sa.Column('reconstruction', sa.Double(), nullable=False),
    sa.Column('kl', sa.Double(), nullable=False),
    sa.Column('log_px', sa.Double(), nullable=True),
    sa.ForeignKeyConstraint(['set_id'], ['embedding_sets.id'], name=op.f('fk_latents_set_id_embedding_sets'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('set_id', 'item_index', name=op.f('pk_latents'))
    )


def downgrade() -> None:
    op.drop_table('latents')
    op.drop_index(op.f('ix_jobs_sweep_id'), table_name='jobs')
    op.drop_index('ix_jobs_status_created', table_name='jobs')
    op.drop_index(op.f('ix_jobs_model_id'), table_name='jobs')
    op.drop_index(op.f('ix_jobs_embedding_set_id'), table_name='jobs')
    op.drop_table('jobs')
    op.drop_table('training_metrics')
    op.drop_index(op.f('ix_embedding_sets_model_id'), table_name='embedding_sets')
    op.drop_index(op.f('ix_embedding_sets_dataset_id'), table_name='embedding_sets')
    op.drop_table('embedding_sets')
    op.drop_index(op.f('ix_models_sweep_id'), table_name='models')
    op.drop_index(op.f('ix_models_dataset_id'), table_name='models')
    op.drop_table('models')
    op.drop_table('items')
    op.drop_table('datasets')
    op.drop_index(op.f('ix_api_keys_prefix'), table_name='api_keys')
    op.drop_table('api_keys')
