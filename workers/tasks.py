"""The Celery tasks: each takes ids, looks everything up again and lets the jobs table decide
whether this delivery runs; a database outage follows workers.outages."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from bridges.mlflow_bridge import sync_pass
from store.db import is_transient
from store.indexes import fail_index
from store.jobs import LeaseLost, release
from store.publishing import INDEX_TASK, TASKS
from workers.app import MAINTENANCE_TASK, MLFLOW_TASK, app
from workers.context import context
from workers.embedding import finish_set, index_set, run_shard, start_embedding
from workers.ingest import run_ingest_job
from workers.lease import new_owner
from workers.maintenance import run_maintenance
from workers.outages import SHARD_RETRIES, end_for, publish_released, retried_on_outage
from workers.sender import FINISH_TASK, RELEASE_TASK, SHARD_TASK
from workers.training import run_training_job

log = logging.getLogger(__name__)


@app.task(name=MAINTENANCE_TASK, ignore_result=True)
def maintenance() -> dict[str, int]:
    ctx = context()
    return run_maintenance(ctx.db, ctx.sender, ctx.settings.republish_seconds,
                           ctx.settings.index_max_attempts,
                           stall=(ctx.settings.embed_stall_seconds,
                                  ctx.settings.embed_shard_rows))


@app.task(name=MLFLOW_TASK, ignore_result=True)
def mlflow_sync() -> dict[str, Any]:
    """One pass of the MLflow bridge; a worker without the setting does nothing."""
    ctx = context()
    s = ctx.settings
    if not s.mlflow_tracking_uri:  # beat has the setting, this worker not
        log.warning("an MLflow sync pass reached a worker without "
                    "LATENTBANK_MLFLOW_TRACKING_URI: give the workers the beat's setting")
        return {"configured": False}
    return sync_pass(ctx.db, ctx.artifacts, s.mlflow_tracking_uri, s.mlflow_experiment,
                     timeout=s.mlflow_timeout_seconds,
                     budget=max(10.0, 4 * s.mlflow_sync_interval)).as_dict()


@app.task(name=TASKS["train"])
def train(job_id: int) -> dict[str, Any]:
    return run_training_job(context(), job_id)


@app.task(name=TASKS["ingest"])
def ingest(job_id: int) -> dict[str, Any]:
    return run_ingest_job(context(), job_id)


@app.task(name=TASKS["embed"])
def embed(job_id: int) -> dict[str, Any]:
    return start_embedding(context(), job_id)


def _shard_failed(exc: Exception, job_id: int, set_id: int, start: int, stop: int,
                  owner: str, finish: bool = False) -> None:
    log.exception("embedding shard failed job_id=%d rows=%d-%d", job_id, start, stop)
    end_for(context(), job_id, owner, exc)  # the set's partial rows go with either end


@app.task(name=SHARD_TASK, bind=True, max_retries=SHARD_RETRIES)
@retried_on_outage(give_up=_shard_failed)
def embed_shard(self: Task, job_id: int, set_id: int, start: int, stop: int,
                owner: str, finish: bool = False) -> dict[str, Any]:
    try:
        return run_shard(context(), job_id, set_id, start, stop, owner, finish)
    except LeaseLost:
        return {"skipped": True}


def _finish_failed(exc: Exception, results: list[dict[str, Any]], job_id: int, set_id: int,
                   owner: str) -> None:
    log.exception("embedding finish failed job_id=%d", job_id)
    end_for(context(), job_id, owner, exc)


@app.task(name=FINISH_TASK, bind=True, max_retries=SHARD_RETRIES)
@retried_on_outage(give_up=_finish_failed)
def embed_finish(self: Task, results: list[dict[str, Any]], job_id: int, set_id: int,
                 owner: str) -> dict[str, Any]:
    try:
        return finish_set(context(), job_id, set_id, owner, results)
    except LeaseLost:
        return {"outcome": "lease_lost"}


@app.task(name=INDEX_TASK, bind=True, max_retries=SHARD_RETRIES, ignore_result=True)
def embed_index(self: Task, set_id: int, owner: str | None = None) -> dict[str, Any]:
    """A ready set's HNSW index and kNN statistics, built by one owner through its retries;
    a failure marks the index `failed` with the reason (searches stay exact)."""
    return _build_index(self, set_id, owner or new_owner())


def _index_failed(exc: Exception, set_id: int, owner: str) -> None:
    log.exception("index build failed set_id=%d", set_id)
    reason = f"{type(exc).__name__}: {exc}"
    if is_transient(exc):
        reason = f"the database stayed away through {SHARD_RETRIES} retries ({reason})"
    try:
        fail_index(context().db, set_id, reason, owner)
    except Exception:  # the database is away still: the lease runs out instead
        log.warning("could not mark the index of set_id=%d failed", set_id, exc_info=True)


@retried_on_outage(give_up=_index_failed)
def _build_index(task: Task, set_id: int, owner: str) -> dict[str, Any]:
    return index_set(context(), set_id, owner)


@app.task(name=RELEASE_TASK, bind=True, max_retries=None, ignore_result=True)
@retried_on_outage(delay=lambda retries: min(10, 1 + retries))
def release_attempt(self: Task, job_id: int, owner: str, reason: str) -> None:
    """Requeue a job whose attempt ended while the database was away, once it is back."""
    ctx = context()
    if release(ctx.db, job_id, owner, reason):
        publish_released(ctx, job_id)
