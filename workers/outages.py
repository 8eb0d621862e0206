"""The workers' one policy for a database outage (store.db.is_transient): it is the
machinery's failure, not the job's, so it is retried, and an outage that outlasts the
retries ends the attempt (the job is requeued) instead of failing the job."""

from __future__ import annotations

import functools
import inspect
import logging
import reprlib
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Task

from store.db import is_transient
from store.jobs import LeaseLost, finish, get_job, release
from store.publishing import publish
from workers.context import Context
from workers.lease import Lease
from workers.sender import RELEASE_TASK

log = logging.getLogger(__name__)
SHARD_RETRIES = 6  # about a minute of back-off (1, 2, 4, 8, 16, 30 s)
T = TypeVar("T")
Body = Callable[..., Any]


def backoff(retries: int) -> float:
    """Seconds before retry number `retries + 1` of a task: 1, 2, 4, 8, 16, then 30."""
    return min(30, 2 ** retries)


def retried_on_outage(delay: Callable[[int], float] = backoff,
                      give_up: Callable[..., None] | None = None) -> Callable[[Body], Body]:
    """Decorate a bound task's body (or a helper taking the task and the task's arguments):
    an outage is retried with the arguments the body got, `delay(retries)` s later, while
    the task's `max_retries` allows; any other error, or an outage past them, goes to
    `give_up(exc, *args, **kwargs)`, then propagates."""

    def decorate(body: Body) -> Body:
        @functools.wraps(body)
        def run(task: Task, *args: Any, **kwargs: Any) -> Any:
            try:
                return body(task, *args, **kwargs)
            except Exception as exc:
                retries, most = task.request.retries, task.max_retries
                if is_transient(exc) and (most is None or retries < most):
                    log.warning("%s %s: the database is away (%s); retrying in %.0f s",
                                task.name, reprlib.repr(args), type(exc).__name__, delay(retries))
                    raise task.retry(args=args, kwargs=kwargs, exc=exc,
                                     countdown=delay(retries)) from None
                if give_up is not None:
                    give_up(exc, *args, **kwargs)
                raise

        # Celery checks a call's arguments against the body's, not the wrapper's
        run.__signature__ = inspect.signature(body)  # type: ignore[attr-defined]
        return run

    return decorate


def retry_while_leased(fn: Callable[[], T], lease: Lease, what: str) -> T:
    """Run `fn` within a running attempt, retrying an outage while a third of the lease
    lasts (the lease still has slack then); the last error propagates."""
    deadline = time.monotonic() + lease.lease_seconds / 3
    pause = 0.2
    while True:
        lease.check()
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("%s: the database is away (%s); retrying in %.1f s", what,
                        type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(2.0, pause * 2)


def end_for(ctx: Context, job_id: int, owner: str, exc: BaseException,
            error: str | None = None) -> dict[str, Any]:
    """An error stopped the attempt: an outage ends it (the job is requeued), any other
    fails the job with `error` (by default the exception's type and message)."""
    if is_transient(exc):
        return end_attempt(ctx, job_id, owner, exc)
    return fail_job(ctx, job_id, owner,
                    f"{type(exc).__name__}: {exc}" if error is None else error)


def fail_job(ctx: Context, job_id: int, owner: str, error: str) -> dict[str, Any]:
    """Fail the job with `error`, or end the attempt if the database is away."""
    try:
        finish(ctx.db, job_id, owner, "failed", error=error)
    except LeaseLost:
        return {"outcome": "lease_lost"}
    except Exception as exc:
        if not is_transient(exc):
            raise
        return end_attempt(ctx, job_id, owner, exc)
    return {"outcome": "failed"}


def end_attempt(ctx: Context, job_id: int, owner: str, exc: BaseException) -> dict[str, Any]:
    """End this attempt and requeue the job at once; if the database cannot be told now,
    the `release_attempt` task retries until it can."""
    reason = f"attempt ended by {type(exc).__name__}: {str(exc).strip()[:200]}"
    log.warning("ending attempt job_id=%d: %s", job_id, reason)
    try:
        release(ctx.db, job_id, owner, reason)
        publish_released(ctx, job_id)
    except Exception as again:
        if not is_transient(again):
            raise
        ctx.sender.send_task(RELEASE_TASK, args=[job_id, owner, reason], countdown=1)
    return {"outcome": "released"}


def publish_released(ctx: Context, job_id: int) -> None:
    """Send the requeued job's task now rather than at the next maintenance pass."""
    job = get_job(ctx.db, job_id)
    if job.status == "queued" and job.published_at is None:
        publish(ctx.db, ctx.sender, job)  # the broker away too: maintenance publishes it later
