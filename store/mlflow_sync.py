"""The MLflow bridge's records: which models are tracked on which MLflow server, and what
each run there holds so far (bridges/mlflow_bridge.py pushes; this module only reads
latentbank's tables and keeps those records). Nothing here talks to MLflow."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects.postgresql import insert

from store.db import Database
from store.errors import NotFound
from store.jobs import METRIC_COLUMNS
from store.tables import MlflowAlias, MlflowBridge, MlflowRun, MlflowSweep, Model

TRACK_WINDOW = 1000  # job ids below the newest tracked one still looked at (late commits)
PASS_LOCK = 0x6D6C666C  # pg_try_advisory_lock key of a bridge pass ("mlfl")
TERMINAL = {"succeeded": "FINISHED", "ready": "FINISHED", "failed": "FAILED",
            "cancelled": "KILLED"}


def run_status_of(status: str | None) -> str:
    """The MLflow run status that follows a job's status (a model's, for a model no
    job is known of)."""
    return TERMINAL.get(status or "", "RUNNING")


@dataclass
class Bridge:
    tracking_uri: str
    instance: str
    experiment: str | None  # the experiment's name `experiment_id` was resolved from
    experiment_id: str | None
    enabled_at: Any


@dataclass
class RunWork:
    """A tracked model whose run is behind, with everything a pass needs to catch it up."""

    model_id: int
    record: dict[str, Any]  # the mlflow_runs row
    job: dict[str, Any] | None  # id, status, items_done, params, sweep_id, times
    model: dict[str, Any] | None  # None: the model was deleted
    dataset: dict[str, Any] | None


def bridge(db: Database, tracking_uri: str) -> Bridge:
    """The bridge's record for this server, made on first use (the moment from which new
    training jobs are tracked)."""
    with db.session() as s:
        s.execute(insert(MlflowBridge).values(tracking_uri=tracking_uri,
                                              instance=uuid.uuid4().hex)
                  .on_conflict_do_nothing())
        row = s.get(MlflowBridge, tracking_uri)
        assert row is not None
        return Bridge(row.tracking_uri, row.instance, row.experiment, row.experiment_id,
                      row.enabled_at)


def set_experiment(db: Database, tracking_uri: str, name: str, experiment_id: str) -> None:
    """The experiment new runs go into (runs made before stay where they are)."""
    with db.session() as s:
        s.execute(update(MlflowBridge).where(MlflowBridge.tracking_uri == tracking_uri)
                  .values(experiment=name, experiment_id=experiment_id))


def track_new_jobs(db: Database, b: Bridge) -> int:
    """Track every training job created since the bridge was enabled; returns how many
    were new. Only jobs above the newest tracked one (less a window for submissions that
    committed out of id order) are looked at, so a pass reads a few rows, not every job."""
    with db.session() as s:
        result = s.execute(text(
            "INSERT INTO mlflow_runs (tracking_uri, model_id, job_id) "
            "SELECT :uri, j.model_id, j.id FROM jobs j WHERE j.kind = 'train' "
            "AND j.model_id IS NOT NULL AND j.created_at >= :since AND j.id > "
            "(SELECT coalesce(max(r.job_id), 0) - :window FROM mlflow_runs r "
            " WHERE r.tracking_uri = :uri) "
            "ON CONFLICT DO NOTHING"),
            {"uri": b.tracking_uri, "since": b.enabled_at, "window": TRACK_WINDOW})
        return int(result.rowcount or 0)


def track_models(db: Database, tracking_uri: str, model_ids: list[int] | None = None) -> int:
    """Back-fill: track these models (every model when None), trained before the bridge
    was configured; returns how many were not tracked yet. NotFound names a missing id."""
    with db.session() as s:
        if model_ids:
            found = set(s.scalars(select(Model.id).where(Model.id.in_(model_ids))))
            missing = sorted(set(model_ids) - found)
            if missing:
                raise NotFound(f"model {missing[0]} does not exist")
        result = s.execute(text(
            "INSERT INTO mlflow_runs (tracking_uri, model_id, job_id) "
            "SELECT :uri, m.id, (SELECT max(j.id) FROM jobs j WHERE j.model_id = m.id "
            "AND j.kind = 'train') FROM models m "
            "WHERE (CAST(:ids AS bigint[]) IS NULL OR m.id = ANY(CAST(:ids AS bigint[]))) "
            "ON CONFLICT DO NOTHING"),
            {"uri": tracking_uri, "ids": list(model_ids) if model_ids else None})
        return int(result.rowcount or 0)


# A tracked model needs a pass when its run lags what latentbank holds, and it is not
# waiting out a refusal (`retry_at`). Kept in SQL so a pass reads only the runs that are
# behind, however many are tracked. Epochs are counted from the metric rows themselves
# (a new attempt starts its job's `items_done` again from 0).
_EPOCHS = ("(SELECT coalesce(max(t.epoch), 0) FROM training_metrics t "
           "WHERE t.model_id = r.model_id)")
_BEHIND = f"""
    (m.id IS NOT NULL AND (
        r.run_id IS NULL OR NOT r.params_logged OR r.sending_through IS NOT NULL
        OR r.epochs_logged < {_EPOCHS}
        OR r.run_status IS DISTINCT FROM
            CASE COALESCE(j.status, m.status) WHEN 'succeeded' THEN 'FINISHED'
                 WHEN 'ready' THEN 'FINISHED' WHEN 'failed' THEN 'FAILED'
                 WHEN 'cancelled' THEN 'KILLED' ELSE 'RUNNING' END
        OR (m.status = 'ready' AND (r.registered_version IS NULL OR NOT r.summary_logged))))
    OR (m.id IS NULL AND NOT r.deleted_marked
        AND (r.registered_version IS NOT NULL OR r.run_status = 'RUNNING'))
"""


def runs_behind(db: Database, tracking_uri: str, limit: int = 100) -> list[RunWork]:
    """Tracked models whose run lags, least recently synced first."""
    sql = text(f"""
        SELECT r.*, {_EPOCHS} AS epochs_recorded,
               j.id AS j_id, j.status AS j_status, j.items_done AS j_items_done,
               j.params AS j_params, j.sweep_id AS j_sweep_id, j.created_at AS j_created_at,
               j.started_at AS j_started_at, j.finished_at AS j_finished_at,
               m.id AS m_id, m.status AS m_status, m.config AS m_config,
               m.summary AS m_summary, m.encoder_uri AS m_encoder_uri,
               m.decoder_uri AS m_decoder_uri, m.encoder_sha256 AS m_encoder_sha256,
               m.decoder_sha256 AS m_decoder_sha256, m.sweep_id AS m_sweep_id,
               d.id AS d_id, d.name AS d_name, d.checksum AS d_checksum
        FROM mlflow_runs r
        LEFT JOIN models m ON m.id = r.model_id
        LEFT JOIN jobs j ON j.id = r.job_id
        LEFT JOIN datasets d ON d.id = m.dataset_id
        WHERE r.tracking_uri = :uri AND ({_BEHIND})
          AND (r.retry_at IS NULL OR r.retry_at <= now())
        ORDER BY r.synced_at NULLS FIRST, r.model_id
        LIMIT :limit""")
    with db.engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(sql, {"uri": tracking_uri,
                                                                 "limit": limit})]
    out = []
    for row in rows:
        record = {c.name: row[c.name] for c in MlflowRun.__table__.columns}
        record["epochs_recorded"] = int(row["epochs_recorded"])
        job = None if row["j_id"] is None else {
            k[2:]: v for k, v in row.items() if k.startswith("j_")}
        model = None if row["m_id"] is None else {
            k[2:]: v for k, v in row.items() if k.startswith("m_")}
        dataset = None if row["d_id"] is None else {
            k[2:]: v for k, v in row.items() if k.startswith("d_")}
        out.append(RunWork(int(row["model_id"]), record, job, model, dataset))
    return out


def count_behind(db: Database, tracking_uri: str) -> int:
    """How many tracked models' runs lag (those waiting out a refusal included)."""
    with db.engine.connect() as conn:
        return int(conn.execute(text(
            f"SELECT count(*) FROM mlflow_runs r LEFT JOIN models m ON m.id = r.model_id "
            f"LEFT JOIN jobs j ON j.id = r.job_id WHERE r.tracking_uri = :uri "
            f"AND ({_BEHIND})"), {"uri": tracking_uri}).scalar() or 0)


def refused(db: Database, tracking_uri: str, model_id: int, error: str) -> None:
    """A run MLflow refused, or whose sync failed here: the error kept, the next try
    after 10 s, doubling to an hour."""
    with db.session() as s:
        s.execute(update(MlflowRun).where(MlflowRun.tracking_uri == tracking_uri,
                                          MlflowRun.model_id == model_id)
                  .values(error=error, failures=MlflowRun.failures + 1,
                          synced_at=text("now()"),
                          retry_at=text("now() + least(3600, 10 * power(2, failures)) "
                                        "* interval '1 second'")))


def update_run(db: Database, tracking_uri: str, model_id: int, **values: Any) -> None:
    """Record what the run holds now (and when it was last synced)."""
    with db.session() as s:
        s.execute(update(MlflowRun).where(MlflowRun.tracking_uri == tracking_uri,
                                          MlflowRun.model_id == model_id)
                  .values(**values, synced_at=text("now()")))


def seconds_through(db: Database, model_id: int, epoch: int) -> float:
    """The training seconds of the model's epochs 1..epoch (its train rows)."""
    with db.engine.connect() as conn:
        return float(conn.execute(text(
            "SELECT coalesce(sum(seconds), 0) FROM training_metrics WHERE model_id = :m "
            "AND split = 'train' AND epoch <= :e"), {"m": model_id, "e": epoch}).scalar())


def metric_rows(db: Database, model_id: int, after: int, through: int) -> list[dict[str, Any]]:
    """The model's metric rows of epochs after..through, in epoch order."""
    cols = ", ".join(METRIC_COLUMNS)
    with db.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(text(
            f"SELECT epoch, split, {cols} FROM training_metrics WHERE model_id = :m "
            "AND epoch > :a AND epoch <= :t ORDER BY epoch, split"),
            {"m": model_id, "a": after, "t": through})]


def sweep_run(db: Database, tracking_uri: str, sweep_id: str) -> MlflowSweep | None:
    with db.session() as s:
        return s.get(MlflowSweep, (tracking_uri, sweep_id))


def save_sweep(db: Database, tracking_uri: str, sweep_id: str, run_id: str,
               run_status: str | None = None) -> None:
    with db.session() as s:
        s.execute(insert(MlflowSweep).values(tracking_uri=tracking_uri, sweep_id=sweep_id,
                                             run_id=run_id, run_status=run_status)
                  .on_conflict_do_update(index_elements=["tracking_uri", "sweep_id"],
                                         set_={"run_id": run_id, "run_status": run_status}))


def sweeps_ended(db: Database, tracking_uri: str) -> list[tuple[str, str]]:
    """(sweep id, parent run id) of parent runs still open whose every job has ended."""
    with db.engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(text(
            "SELECT s.sweep_id, s.run_id FROM mlflow_sweeps s WHERE s.tracking_uri = :uri "
            "AND s.run_status IS NULL AND NOT EXISTS (SELECT 1 FROM jobs j WHERE "
            "j.sweep_id = s.sweep_id AND j.status IN ('queued', 'running'))"),
            {"uri": tracking_uri})]


@dataclass
class AliasState:
    desired: dict[str, tuple[str | None, str | None]]  # alias -> (model, version)
    current: dict[str, MlflowAlias]


def alias_state(db: Database, tracking_uri: str) -> AliasState:
    """latentbank's aliases of tracked models, each with its model's registered version
    (None while it has none yet), beside what the bridge last set in MLflow."""
    with db.engine.connect() as conn:
        desired = {r[0]: (r[1], r[2]) for r in conn.execute(text(
            "SELECT a.name, r.registered_name, r.registered_version FROM aliases a "
            "JOIN mlflow_runs r ON r.model_id = a.model_id AND r.tracking_uri = :uri"),
            {"uri": tracking_uri})}
    with db.session() as s:
        current = {a.name: a for a in s.scalars(
            select(MlflowAlias).where(MlflowAlias.tracking_uri == tracking_uri))}
        for a in current.values():
            s.expunge(a)
    return AliasState(desired, current)


def save_alias(db: Database, tracking_uri: str, name: str, registered_name: str | None,
               version: str | None, error: str | None = None) -> None:
    values = {"registered_name": registered_name, "version": version, "error": error}
    with db.session() as s:
        s.execute(insert(MlflowAlias).values(tracking_uri=tracking_uri, name=name, **values)
                  .on_conflict_do_update(index_elements=["tracking_uri", "name"], set_=values))


def drop_alias(db: Database, tracking_uri: str, name: str) -> None:
    with db.session() as s:
        s.execute(delete(MlflowAlias).where(MlflowAlias.tracking_uri == tracking_uri,
                                            MlflowAlias.name == name))


def job_sync_state(db: Database, job_id: int) -> dict[str, Any] | None:
    """Whether a training job's MLflow run holds everything latentbank does (`in_sync`),
    for each server it is tracked on (the first); None when it is tracked nowhere."""
    with db.engine.connect() as conn:
        row = conn.execute(text(f"""
            SELECT r.tracking_uri, r.run_id, r.epochs_logged, r.run_status,
                   r.registered_name, r.registered_version, r.error, r.synced_at,
                   r.retry_at, {_EPOCHS} AS epochs_recorded, ({_BEHIND}) AS behind
            FROM mlflow_runs r JOIN jobs j ON j.id = r.job_id
            LEFT JOIN models m ON m.id = r.model_id
            WHERE r.job_id = :job ORDER BY r.created_at LIMIT 1"""), {"job": job_id}).first()
    if row is None:
        return None
    return {"tracking_uri": row.tracking_uri, "run_id": row.run_id,
            "in_sync": not row.behind, "epochs_logged": row.epochs_logged,
            "epochs_recorded": row.epochs_recorded, "run_status": row.run_status,
            "registered_model": row.registered_name,
            "registered_version": row.registered_version, "error": row.error,
            "retry_at": row.retry_at, "synced_at": row.synced_at}


@contextmanager
def pass_lock(db: Database) -> Iterator[bool]:
    """One bridge pass at a time across every worker: yields False when another holds it."""
    with db.engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                {"k": PASS_LOCK}).scalar())
        conn.commit()  # the lock is the session's: no transaction stays open for the pass
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PASS_LOCK})
                conn.commit()
