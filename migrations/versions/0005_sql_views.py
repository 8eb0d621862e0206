"""The documented SQL surface: stable, versioned views in the schema `lb_v1`.

Analysts query these from psql, pandas or a BI tool (README, "SQL"); the internal tables
may change, the views keep their columns (tests/store/test_sql_surface.py pins them). An
incompatible change goes into a new schema `lb_v2` while `lb_v1` stays. A read-only role
(`latentbank sql-role`) may read these views and nothing else.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 11:40:00
"""

from __future__ import annotations

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

VIEWS = {
    "datasets": """
        SELECT d.id AS dataset_id, d.name, d.item_shape, d.n_items, d.has_labels,
               d.created_at
        FROM public.datasets d""",
    "models": """
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
                     ORDER BY a.name) AS aliases
        FROM public.models m""",
    "training_metrics": """
        SELECT t.model_id, t.epoch, t.split, t.elbo, t.reconstruction, t.kl, t.log_px,
               t.importance_samples, t.loss, t.beta, t.lr, t.active_units, t.seconds
        FROM public.training_metrics t""",
    "embedding_sets": """
        SELECT e.id AS set_id, e.model_id, e.dataset_id, e.status, e.dim, e.n_items,
               e.importance_samples, e.index_status, e.index_metric, e.created_at,
               e.ready_at,
               ARRAY(SELECT a.name FROM public.aliases a WHERE a.embedding_set_id = e.id
                     ORDER BY a.name) AS aliases
        FROM public.embedding_sets e""",
    "latents": """
        SELECT l.set_id, e.model_id, e.dataset_id, i.key, l.item_index, i.label,
               i.metadata, l.mu, l.logvar, l.elbo, l.reconstruction, l.kl, l.log_px,
               e.importance_samples
        FROM public.latents l
        JOIN public.embedding_sets e ON e.id = l.set_id AND e.status = 'ready'
        JOIN public.items i ON i.dataset_id = e.dataset_id AND i.index = l.item_index""",
}


def upgrade() -> None:
    op.execute("CREATE SCHEMA IF NOT EXISTS lb_v1")
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW lb_v1.{name} AS {body}")
    op.execute("COMMENT ON SCHEMA lb_v1 IS 'latentbank SQL surface, version 1: stable views "
               "(README, SQL)'")
    op.execute("COMMENT ON VIEW lb_v1.latents IS 'one row per item of a ready embedding set: "
               "mu is a pgvector vector; ELBO, reconstruction, KL and log p(x) in nats'")


def downgrade() -> None:
    op.execute("DROP SCHEMA IF EXISTS lb_v1 CASCADE")
