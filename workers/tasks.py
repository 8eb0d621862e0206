"""Celery tasks. Each takes ids, looks everything up again, and lets the jobs table decide
whether this delivery runs (store.jobs.claim): a redelivered task never repeats work.

Failures are sorted in two: the job's own (bad data, a bug: the job fails with the error)
and the machinery's (the database went away: the attempt ends and the job is requeued,
see `workers.training.end_attempt`). Embedding shards and the finishing step first retry
a database outage themselves (both are idempotent).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from store.db import is_transient
from store.indexes import fail_index
from store.jobs import LeaseLost, finish, release
from workers.app import MAINTENANCE_TASK, app
from workers.context import context

log = logging.getLogger(__name__)
SHARD_RETRIES = 6  # about a minute of back-off (1, 2, 4, 8, 16, 30 s)


@app.task(name=MAINTENANCE_TASK, ignore_result=True)
def maintenance() -> dict[str, int]:
    from workers.maintenance import run_maintenance

    ctx = context()
    return run_maintenance(ctx.db, app, ctx.settings.republish_seconds,
                           ctx.settings.index_max_attempts)


@app.task(name="latentbank.train")
def train(job_id: int) -> dict[str, Any]:
    from workers.training import run_training_job

    return run_training_job(context(), job_id)


@app.task(name="latentbank.ingest")
def ingest(job_id: int) -> dict[str, Any]:
    from workers.ingest import run_ingest_job

    return run_ingest_job(context(), job_id)


@app.task(name="latentbank.embed")
def embed(job_id: int) -> dict[str, Any]:
    from workers.embedding import start_embedding

    return start_embedding(context(), job_id)


@app.task(name="latentbank.embed_shard", bind=True, max_retries=SHARD_RETRIES)
def embed_shard(self: Task, job_id: int, set_id: int, start: int, stop: int,
                owner: str) -> dict[str, Any]:
    from workers.embedding import run_shard

    try:
        return run_shard(context(), job_id, set_id, start, stop, owner)
    except LeaseLost:
        return {"skipped": True}
    except Exception as exc:
        if is_transient(exc) and self.request.retries < SHARD_RETRIES:
            log.warning("embedding shard job_id=%d rows=%d-%d: the database is away (%s); "
                        "retrying", job_id, start, stop, type(exc).__name__)
            raise self.retry(exc=exc, countdown=min(30, 2 ** self.request.retries)) from None
        log.exception("embedding shard failed job_id=%d rows=%d-%d", job_id, start, stop)
        _end_embedding(job_id, owner, exc)
        raise


@app.task(name="latentbank.embed_finish", bind=True, max_retries=SHARD_RETRIES)
def embed_finish(self: Task, results: list[dict[str, Any]], job_id: int, set_id: int,
                 owner: str) -> dict[str, Any]:
    from workers.embedding import finish_set

    try:
        return finish_set(context(), job_id, set_id, owner, results)
    except LeaseLost:
        return {"outcome": "lease_lost"}
    except Exception as exc:
        if is_transient(exc) and self.request.retries < SHARD_RETRIES:
            log.warning("embedding finish job_id=%d: the database is away (%s); retrying",
                        job_id, type(exc).__name__)
            raise self.retry(exc=exc, countdown=min(30, 2 ** self.request.retries)) from None
        log.exception("embedding finish failed job_id=%d", job_id)
        _end_embedding(job_id, owner, exc)
        raise


@app.task(name="latentbank.embed_index", bind=True, max_retries=SHARD_RETRIES,
          ignore_result=True)
def embed_index(self: Task, set_id: int, owner: str | None = None) -> dict[str, Any]:
    """A ready set's HNSW index and kNN statistics (the set is searchable meanwhile).

    A database outage is retried by the same owner (its lease is taken again, no new
    attempt counted); any other failure, or an outage that outlasts the retries, marks
    the index `failed` with the reason (searches stay exact, the set can be deleted).
    Where even that cannot be written, the lease runs out and the maintenance pass
    sends the build again, or marks it failed once its attempts are spent."""
    from workers.embedding import index_set
    from workers.lease import new_owner

    owner = owner or new_owner()
    ctx = context()
    try:
        return index_set(ctx, set_id, owner)
    except Exception as exc:
        if is_transient(exc) and self.request.retries < SHARD_RETRIES:
            raise self.retry(exc=exc, countdown=min(30, 2 ** self.request.retries),
                             args=[set_id], kwargs={"owner": owner}) from None
        log.exception("index build failed set_id=%d", set_id)
        reason = f"{type(exc).__name__}: {exc}"
        if is_transient(exc):
            reason = f"the database stayed away through {SHARD_RETRIES} retries ({reason})"
        try:
            fail_index(ctx.db, set_id, reason, owner)
        except Exception:  # the database is away still: the lease runs out instead
            log.warning("could not mark the index of set_id=%d failed", set_id, exc_info=True)
        raise


def _end_embedding(job_id: int, owner: str, exc: Exception) -> None:
    """A transient failure ends the attempt (requeued); any other fails the job. Either
    way the set's partial rows go (a set is complete or empty)."""
    from workers.training import end_attempt

    ctx = context()
    if is_transient(exc):
        end_attempt(ctx, job_id, owner, exc)
        return
    try:
        finish(ctx.db, job_id, owner, "failed", error=f"{type(exc).__name__}: {exc}")
    except LeaseLost:
        pass
    except Exception as again:
        if not is_transient(again):
            raise
        end_attempt(ctx, job_id, owner, again)


@app.task(name="latentbank.release_attempt", bind=True, max_retries=None,
          ignore_result=True)
def release_attempt(self: Task, job_id: int, owner: str, reason: str) -> None:
    """Requeue a job whose attempt ended while the database was away, once it is back."""
    from workers.training import publish_released

    ctx = context()
    try:
        if release(ctx.db, job_id, owner, reason):
            publish_released(ctx, job_id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise self.retry(exc=exc, countdown=min(10, 1 + self.request.retries)) from None
