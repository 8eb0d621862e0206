"""Monte-Carlo errors of log p(x): `log_px_se` and `ess` (the importance weights'
effective sample size) on each latent row and each metric row; the views of lb_v1 gain
them (and the models view the likelihood's kind, the held-out error and bits/dim) as
columns appended at the end, so every column a client used keeps its name, type and
position (CREATE OR REPLACE VIEW may only append).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 23:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

MODELS_VIEW = """
    CREATE OR REPLACE VIEW lb_v1.models AS
    SELECT m.id AS model_id, m.dataset_id, m.status,
           m.config -> 'model' ->> 'family' AS family,
           (m.config -> 'model' ->> 'latent_dim')::integer AS latent_dim,
           m.config -> 'model' ->> 'likelihood' AS likelihood,
           m.config,
           (m.summary ->> 'heldout_elbo')::double precision AS heldout_elbo,
           (m.summary ->> 'heldout_reconstruction')::double precision
               AS heldout_reconstruction,
           (m.summary ->> 'heldout_kl')::double precision AS heldout_kl,
           (m.summary ->> 'heldout_log_px')::double precision AS heldout_log_px,
           (m.summary ->> 'heldout_importance_samples')::integer
               AS heldout_importance_samples,
           (m.summary ->> 'heldout_active_units')::integer AS active_units,
           m.summary -> 'kl_per_dim' AS kl_per_dim,
           m.sweep_id, m.created_at, m.updated_at,
           ARRAY(SELECT a.name FROM public.aliases a WHERE a.model_id = m.id
                 ORDER BY a.name) AS aliases{extra}
    FROM public.models m"""
MODELS_EXTRA = """,
           m.summary ->> 'likelihood_kind' AS likelihood_kind,
           (m.summary ->> 'heldout_log_px_se')::double precision AS heldout_log_px_se,
           (m.summary ->> 'heldout_bits_per_dim')::double precision AS heldout_bits_per_dim"""
METRICS_VIEW = """
    CREATE OR REPLACE VIEW lb_v1.training_metrics AS
    SELECT t.model_id, t.epoch, t.split, t.elbo, t.reconstruction, t.kl, t.log_px,
           t.importance_samples, t.loss, t.beta, t.lr, t.active_units, t.seconds{extra}
    FROM public.training_metrics t"""
LATENTS_VIEW = """
    CREATE OR REPLACE VIEW lb_v1.latents AS
    SELECT l.set_id, e.model_id, l.dataset_id, i.key, l.item_index, i.label,
           i.metadata, l.mu, l.logvar, l.elbo, l.reconstruction, l.kl, l.log_px,
           e.importance_samples{extra}
    FROM public.latents l
    JOIN public.embedding_sets e ON e.id = l.set_id AND e.status = 'ready'
    JOIN public.items i ON i.dataset_id = l.dataset_id AND i.index = l.dataset_index"""
VIEWS = {"models": (MODELS_VIEW, MODELS_EXTRA),
         "training_metrics": (METRICS_VIEW, ", t.log_px_se, t.ess"),
         "latents": (LATENTS_VIEW, ", l.log_px_se, l.ess")}


def upgrade() -> None:
    for table in ('latents', 'training_metrics'):
        op.add_column(table, sa.Column('log_px_se', sa.Double(), nullable=True))
        op.add_column(table, sa.Column('ess', sa.Double(), nullable=True))
    for view, extra in VIEWS.values():
        op.execute(view.format(extra=extra))


def downgrade() -> None:
    # a view cannot lose columns in place: drop it and make it as it was (the reader role
    # keeps its SELECT through the schema's default privileges)
    for name, (view, _) in VIEWS.items():
        op.execute(f"DROP VIEW lb_v1.{name}")
        op.execute(view.format(extra=""))
    for table in ('latents', 'training_metrics'):
        op.drop_column(table, 'ess')
        op.drop_column(table, 'log_px_se')
