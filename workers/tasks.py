"""Celery tasks. Each takes ids, looks everything up again, and lets the jobs table decide
whether this delivery runs (store.jobs.claim): a redelivered task never repeats work."""

from __future__ import annotations

import logging
from typing import Any

from celery import chord

from store.jobs import claim, finish
from store.latents import mark_set
from workers.app import app
from workers.context import context
from workers.lease import new_owner

log = logging.getLogger(__name__)


@app.task(name="latentbank.train")
def train(job_id: int) -> dict[str, Any]:
    from workers.training import run_training_job

    return run_training_job(context(), job_id)


@app.task(name="latentbank.embed")
def embed(job_id: int) -> dict[str, Any]:
    """Claim the job, then fan its shards out as a chord with a finishing task."""
    from workers.embedding import shard_ranges

    ctx = context()
    owner = new_owner()
    got = claim(ctx.db, job_id, owner, ctx.settings.embed_lease_seconds)
    if got.outcome != "claimed":
        log.info("embedding delivery skipped job_id=%d outcome=%s", job_id, got.outcome)
        return {"outcome": got.outcome}
    job = got.job
    assert job is not None and job.embedding_set_id is not None
    set_id = job.embedding_set_id
    try:
        from store.latents import get_set

        es = get_set(ctx.db, set_id)
        mark_set(ctx.db, set_id, status="writing")
        with ctx.db.engine.begin() as conn:  # a fresh attempt counts its items anew
            from sqlalchemy import text

            conn.execute(text("UPDATE jobs SET params = params - 'done_rows' WHERE id = :j"),
                         {"j": job_id})
        shards = shard_ranges(es.n_items, ctx.settings.embed_shard_rows)
        chord([embed_shard.si(job_id, set_id, a, b, owner) for a, b in shards],
              embed_finish.s(job_id, set_id, owner)).apply_async()
        log.info("embedding started job_id=%d set_id=%d shards=%d", job_id, set_id,
                 len(shards))
        return {"outcome": "dispatched", "shards": len(shards)}
    except Exception as exc:
        log.exception("embedding dispatch failed job_id=%d", job_id)
        mark_set(ctx.db, set_id, status="failed")
        finish(ctx.db, job_id, owner, "failed", error=f"{type(exc).__name__}: {exc}")
        return {"outcome": "failed"}


def _fail(job_id: int, set_id: int, owner: str, exc: Exception) -> None:
    from store.jobs import LeaseLost

    ctx = context()
    try:
        mark_set(ctx.db, set_id, status="failed")
        finish(ctx.db, job_id, owner, "failed", error=f"{type(exc).__name__}: {exc}")
    except LeaseLost:
        pass


@app.task(name="latentbank.embed_shard")
def embed_shard(job_id: int, set_id: int, start: int, stop: int, owner: str) -> dict[str, Any]:
    from store.jobs import LeaseLost
    from workers.embedding import run_shard

    try:
        return run_shard(context(), job_id, set_id, start, stop, owner)
    except LeaseLost:
        return {"skipped": True}
    except Exception as exc:
        log.exception("embedding shard failed job_id=%d rows=%d-%d", job_id, start, stop)
        _fail(job_id, set_id, owner, exc)
        raise


@app.task(name="latentbank.embed_finish")
def embed_finish(results: list[dict[str, Any]], job_id: int, set_id: int,
                 owner: str) -> dict[str, Any]:
    from store.jobs import LeaseLost
    from workers.embedding import finish_set

    try:
        return finish_set(context(), job_id, set_id, owner, results)
    except LeaseLost:
        return {"outcome": "lease_lost"}
    except Exception as exc:
        log.exception("embedding finish failed job_id=%d", job_id)
        _fail(job_id, set_id, owner, exc)
        raise
