"""The MLflow bridge's records (bridges/mlflow_bridge.py): the tracking servers it pushes
to, each model's run there (what it holds so far), each sweep's parent run, and the
aliases as last mirrored. Nothing else changes: the bridge only reads latentbank's own
tables.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04 04:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def _now() -> sa.Column:
    return sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                     nullable=False)


def upgrade() -> None:
    op.create_table(
        'mlflow_bridges',
        sa.Column('tracking_uri', sa.Text(), nullable=False),
        sa.Column('instance', sa.Text(), nullable=False),
        sa.Column('experiment', sa.Text(), nullable=True),
        sa.Column('experiment_id', sa.Text(), nullable=True),
        sa.Column('enabled_at', sa.DateTime(timezone=True), server_default=sa.text('now()'),
                  nullable=False),
        sa.PrimaryKeyConstraint('tracking_uri', name=op.f('pk_mlflow_bridges')))
    op.create_table(
        'mlflow_runs',
        sa.Column('tracking_uri', sa.Text(), nullable=False),
        sa.Column('model_id', sa.BigInteger(), nullable=False),
        sa.Column('job_id', sa.BigInteger(), nullable=True),
        sa.Column('run_id', sa.Text(), nullable=True),
        sa.Column('params_logged', sa.Boolean(), server_default='false', nullable=False),
        sa.Column('epochs_logged', sa.Integer(), server_default='0', nullable=False),
        sa.Column('sending_through', sa.Integer(), nullable=True),
        sa.Column('run_status', sa.Text(), nullable=True),
        sa.Column('summary_logged', sa.Boolean(), server_default='false', nullable=False),
        sa.Column('registered_name', sa.Text(), nullable=True),
        sa.Column('registered_version', sa.Text(), nullable=True),
        sa.Column('deleted_marked', sa.Boolean(), server_default='false', nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('failures', sa.Integer(), server_default='0', nullable=False),
        sa.Column('retry_at', sa.DateTime(timezone=True), nullable=True),
        _now(),
        sa.Column('synced_at', sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint('tracking_uri', 'model_id', name=op.f('pk_mlflow_runs')))
    op.create_index(op.f('ix_mlflow_runs_job_id'), 'mlflow_runs', ['job_id'])
    op.create_table(
        'mlflow_sweeps',
        sa.Column('tracking_uri', sa.Text(), nullable=False),
        sa.Column('sweep_id', sa.Text(), nullable=False),
        sa.Column('run_id', sa.Text(), nullable=False),
        sa.Column('run_status', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('tracking_uri', 'sweep_id', name=op.f('pk_mlflow_sweeps')))
    op.create_table(
        'mlflow_aliases',
        sa.Column('tracking_uri', sa.Text(), nullable=False),
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('registered_name', sa.Text(), nullable=True),
        sa.Column('version', sa.Text(), nullable=True),
        sa.Column('error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('tracking_uri', 'name', name=op.f('pk_mlflow_aliases')))


def downgrade() -> None:
    for table in ('mlflow_aliases', 'mlflow_sweeps', 'mlflow_runs', 'mlflow_bridges'):
        op.drop_table(table)
