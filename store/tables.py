"""SQLAlchemy 2 tables, changed only through Alembic revisions; statuses are text under
CHECK constraints, and the per-set HNSW indexes are data (`store.indexes`), not schema."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pgvector.sqlalchemy import HALFVEC, Vector
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
JOB_KINDS = ("train", "embed", "ingest")
MODEL_STATUSES = ("pending", "training", "ready", "failed", "cancelled")
SET_STATUSES = ("pending", "writing", "finishing", "ready", "failed", "cancelled")
INDEX_STATUSES = ("none", "building", "ready", "skipped", "failed")
VECTOR_TYPES = ("vector", "halfvec")
SPLITS = ("train", "val", "test")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=f"{column}_valid")


def _now() -> Mapped[dt.datetime]:
    return mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    item_shape: Mapped[list[int]] = mapped_column(ARRAY(Integer))
    dtype: Mapped[str] = mapped_column(Text)  # stored (canonical) dtype: float32
    source_dtype: Mapped[str] = mapped_column(Text)
    source_format: Mapped[str] = mapped_column(Text)
    n_items: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(Text, unique=True)  # sha256 of canonical content
    source_uri: Mapped[str | None] = mapped_column(Text)
    artifact_key: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    min_value: Mapped[float] = mapped_column(Double)
    max_value: Mapped[float] = mapped_column(Double)
    has_labels: Mapped[bool] = mapped_column(Boolean)
    # How it was read (ingest/): {"image": ImageSpec.to_dict(), "report": {...},
    # "options": {...}}; None for arrays registered before 0009 or without images.
    ingest: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[dt.datetime] = _now()


class Item(Base):
    __tablename__ = "items"
    __table_args__ = (UniqueConstraint("dataset_id", "key", name="uq_items_dataset_key"),)

    dataset_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    key: Mapped[str] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONB)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (_one_of("status", MODEL_STATUSES),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("datasets.id", ondelete="RESTRICT"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)  # {"model": {...}, "training": {...}}
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    checkpoint_uri: Mapped[str | None] = mapped_column(Text)
    encoder_uri: Mapped[str | None] = mapped_column(Text)
    decoder_uri: Mapped[str | None] = mapped_column(Text)
    encoder_sha256: Mapped[str | None] = mapped_column(Text)
    decoder_sha256: Mapped[str | None] = mapped_column(Text)
    sweep_id: Mapped[str | None] = mapped_column(Text, index=True)
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        _one_of("status", JOB_STATUSES),
        _one_of("kind", JOB_KINDS),
        Index("ix_jobs_status_created", "status", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default="queued")
    progress: Mapped[float] = mapped_column(Double, server_default="0")
    progress_message: Mapped[str | None] = mapped_column(Text)
    eta_seconds: Mapped[float | None] = mapped_column(Double)
    # Counted work of the current attempt (embedding: items written; training: epochs
    # recorded) out of its total, for progress figures that do not parse messages.
    items_done: Mapped[int] = mapped_column(BigInteger, server_default="0")
    items_total: Mapped[int | None] = mapped_column(BigInteger)
    params: Mapped[dict[str, Any]] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="3")
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    # sha256 of the request the key came with: the key replays only that request
    request_hash: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default="false")
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    published_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    model_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("models.id", ondelete="SET NULL"), index=True)
    embedding_set_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("embedding_sets.id", ondelete="SET NULL"), index=True)
    sweep_id: Mapped[str | None] = mapped_column(Text, index=True)
    # an ingest job's dataset, once registered
    dataset_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[dt.datetime] = _now()
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class TrainingMetric(Base):
    __tablename__ = "training_metrics"
    __table_args__ = (
        UniqueConstraint("model_id", "epoch", "split", name="uq_training_metrics_epoch_split"),
        _one_of("split", SPLITS),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    model_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("models.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    split: Mapped[str] = mapped_column(Text)
    elbo: Mapped[float] = mapped_column(Double)
    reconstruction: Mapped[float] = mapped_column(Double)
    kl: Mapped[float] = mapped_column(Double)
    log_px: Mapped[float | None] = mapped_column(Double)
    log_px_se: Mapped[float | None] = mapped_column(Double)  # Monte-Carlo error of log_px
    ess: Mapped[float | None] = mapped_column(Double)  # mean effective sample size
    importance_samples: Mapped[int] = mapped_column(Integer, server_default="0")
    loss: Mapped[float | None] = mapped_column(Double)
    beta: Mapped[float] = mapped_column(Double)
    lr: Mapped[float] = mapped_column(Double)
    active_units: Mapped[int | None] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Double)


class EmbeddingSet(Base):
    __tablename__ = "embedding_sets"
    __table_args__ = (
        _one_of("status", SET_STATUSES),
        _one_of("index_status", INDEX_STATUSES),
        CheckConstraint("index_metric IN ('l2', 'cosine')", name="index_metric_valid"),
        _one_of("vector_type", VECTOR_TYPES),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    model_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("models.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(Text, server_default="pending")
    dim: Mapped[int] = mapped_column(Integer)
    n_items: Mapped[int] = mapped_column(BigInteger)
    importance_samples: Mapped[int] = mapped_column(Integer, server_default="0")
    index_status: Mapped[str] = mapped_column(Text, server_default="none")
    index_metric: Mapped[str] = mapped_column(Text, server_default="l2")
    # How its latents are stored: `vector` (float32: mu, logvar) or `halfvec` (float16:
    # mu_half, logvar_half, half the bytes; store/vectors.py reads either as float32).
    vector_type: Mapped[str] = mapped_column(Text, server_default="vector")
    # Calibrated at index build: the ef_search that reaches the recall target, or NULL
    # when exact search is as fast or the index cannot reach the target.
    hnsw_ef_search: Mapped[int | None] = mapped_column(Integer)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[dt.datetime] = _now()
    ready_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # The index build (store.indexes: index_owed, claim_index): owed since, task sent at,
    # the process building it under a lease, builds started, and why it failed.
    index_requested_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    index_sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    index_owner: Mapped[str | None] = mapped_column(Text)
    index_lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    index_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    index_error: Mapped[str | None] = mapped_column(Text)
    # The index build as it runs and as it ended (store.indexes.BuildPlan, IndexWatch):
    # phase, tuples loaded, workers, memory given and needed, whether the graph fitted.
    index_build: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class EmbeddingSetPart(Base):
    """A dataset whose items a set holds, at positions `start .. start + n_items - 1`: the
    set's own dataset at 0 (`ready` from the start: the set's status tells its state),
    then each dataset an embedding job appends, `writing` until that job succeeds (one
    append at a time per set; a failed or cancelled one is removed with its rows)."""

    __tablename__ = "embedding_set_parts"
    __table_args__ = (CheckConstraint("status IN ('writing', 'ready')", name="status_valid"),)

    set_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("embedding_sets.id", ondelete="CASCADE"), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    start: Mapped[int] = mapped_column(BigInteger)
    n_items: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, server_default="writing")
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = _now()


class Latent(Base):
    """One item of a set: `item_index` is its position in the set, (`dataset_id`,
    `dataset_index`) the item it codes (the set's own dataset, or an appended one)."""

    __tablename__ = "latents"
    # One partition per set (store/partitions.py), made and dropped with the set: no
    # foreign key, a row cannot be written for a set without a partition.
    __table_args__ = ({"postgresql_partition_by": "LIST (set_id)"},)

    set_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    item_index: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(BigInteger)
    dataset_index: Mapped[int] = mapped_column(BigInteger)
    # one pair per set, by its vector_type (a partition cannot change a column's type)
    mu: Mapped[Any | None] = mapped_column(Vector())
    logvar: Mapped[Any | None] = mapped_column(Vector())
    mu_half: Mapped[Any | None] = mapped_column(HALFVEC())
    logvar_half: Mapped[Any | None] = mapped_column(HALFVEC())
    elbo: Mapped[float] = mapped_column(Double)
    reconstruction: Mapped[float] = mapped_column(Double)
    kl: Mapped[float] = mapped_column(Double)
    log_px: Mapped[float | None] = mapped_column(Double)
    log_px_se: Mapped[float | None] = mapped_column(Double)  # Monte-Carlo error of log_px
    ess: Mapped[float | None] = mapped_column(Double)  # the importance weights' ESS


ALIAS_PATTERN = r"^[a-z][a-z0-9_.-]{0,62}$"


class Alias(Base):
    """A name (`prod`, `staging`) pointing at one model or one embedding set. The foreign
    keys RESTRICT: the database itself refuses to delete an aliased object."""

    __tablename__ = "aliases"
    __table_args__ = (
        CheckConstraint("(model_id IS NULL) <> (embedding_set_id IS NULL)",
                        name="one_target"),
        CheckConstraint(f"name ~ '{ALIAS_PATTERN}'", name="name_valid"),
    )

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    model_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("models.id", ondelete="RESTRICT"), index=True)
    embedding_set_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("embedding_sets.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[dt.datetime] = _now()
    updated_at: Mapped[dt.datetime] = _now()


class AliasEvent(Base):
    """Every change of an alias, kept after the alias or its targets are gone."""

    __tablename__ = "alias_events"
    __table_args__ = (
        CheckConstraint("action IN ('created', 'moved', 'deleted')", name="action_valid"),
        Index("ix_alias_events_name_id", "name", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(Text)  # model | embedding_set
    target_id: Mapped[int | None] = mapped_column(BigInteger)
    previous_id: Mapped[int | None] = mapped_column(BigInteger)
    key_id: Mapped[int | None] = mapped_column(BigInteger)  # the API key that made it
    at: Mapped[dt.datetime] = _now()


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text, index=True)  # shown to users, not secret
    key_hash: Mapped[str] = mapped_column(Text, unique=True)  # sha256 of the whole key
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    created_at: Mapped[dt.datetime] = _now()
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class MlflowBridge(Base):
    """An MLflow tracking server the bridge pushes to (bridges/mlflow_bridge.py): training
    jobs created after `enabled_at` are tracked there by themselves, older models when
    `latentbank mlflow sync` is asked to. `instance` tags every run and version this
    database made there (runs are found again by it)."""

    __tablename__ = "mlflow_bridges"

    tracking_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    instance: Mapped[str] = mapped_column(Text)
    experiment: Mapped[str | None] = mapped_column(Text)  # the name `experiment_id` is of
    experiment_id: Mapped[str | None] = mapped_column(Text)
    enabled_at: Mapped[dt.datetime] = _now()


class MlflowRun(Base):
    """What one model's MLflow run holds so far. No foreign key to the model: the record
    outlives a deleted model so that the deletion reaches the registry too."""

    __tablename__ = "mlflow_runs"

    tracking_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    model_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    run_id: Mapped[str | None] = mapped_column(Text)
    params_logged: Mapped[bool] = mapped_column(Boolean, server_default="false")
    epochs_logged: Mapped[int] = mapped_column(Integer, server_default="0")
    # the last epoch of a metric batch sent and not yet confirmed: the server may hold it
    sending_through: Mapped[int | None] = mapped_column(Integer)
    run_status: Mapped[str | None] = mapped_column(Text)  # RUNNING | FINISHED | FAILED | KILLED
    summary_logged: Mapped[bool] = mapped_column(Boolean, server_default="false")
    registered_name: Mapped[str | None] = mapped_column(Text)
    registered_version: Mapped[str | None] = mapped_column(Text)
    deleted_marked: Mapped[bool] = mapped_column(Boolean, server_default="false")
    error: Mapped[str | None] = mapped_column(Text)
    # a record MLflow refused (or that failed here) waits before its next try, doubling
    failures: Mapped[int] = mapped_column(Integer, server_default="0")
    retry_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = _now()
    synced_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class MlflowSweep(Base):
    """A sweep's parent run: its training jobs' runs are its children."""

    __tablename__ = "mlflow_sweeps"

    tracking_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    sweep_id: Mapped[str] = mapped_column(Text, primary_key=True)
    run_id: Mapped[str] = mapped_column(Text)
    run_status: Mapped[str | None] = mapped_column(Text)


class MlflowAlias(Base):
    """A latentbank model alias as the bridge last set it in MLflow (`version` of
    `registered_name`), or why it could not (`error`: a name MLflow refuses)."""

    __tablename__ = "mlflow_aliases"

    tracking_uri: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    registered_name: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
