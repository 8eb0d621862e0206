"""How an embedding job cuts its items into shards, and what a maintenance pass sends for
an attempt that stalled: its unwritten shards again, or its finishing step once every
row is written (docs/internals/workers.md, "The database or the broker away")."""

from __future__ import annotations

import logging
from typing import Any

from store.db import Database
from store.embedding_sets import get_set
from store.latent_rows import unwritten
from store.publishing import QUEUES, TaskSender
from store.recovery import stalled_embeddings
from store.tables import Job
from workers.sender import FINISH_TASK, SHARD_TASK

log = logging.getLogger(__name__)


def shard_ranges(n: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + shard_rows)) for a in range(0, n, shard_rows)]


def rows_per_shard(base: int, importance_samples: int) -> int:
    """`embed_shard_rows` at K <= 100; above, divided by K / 100 (at least 256 rows), so
    a shard is about the same work whatever K: a K = 5000 set of 10,000 items is 10
    shards, not one of ten minutes with no progress and all of it lost to a kill."""
    if importance_samples <= 100:
        return base
    return max(min(base, 256), base * 100 // importance_samples)


def job_shards(params: dict[str, Any], n_items: int, importance_samples: int,
               base_rows: int) -> list[tuple[int, int]]:
    """The positions `[a, b)` of each shard of an embedding job: the set's items, or an
    append's (positions start .. start + n - 1, one part of the set, which no shard
    spans), cut at the size its first attempt recorded (`shard_rows`), else at
    `rows_per_shard(base_rows, importance_samples)`."""
    append = params.get("append")
    first, n = (int(append["start"]), int(append["n_items"])) if append else (0, n_items)
    size = int(params.get("shard_rows") or rows_per_shard(base_rows, importance_samples))
    return [(first + a, first + b) for a, b in shard_ranges(n, size)]


def owed_shards(db: Database, job: Job, base_rows: int) -> list[tuple[int, int]]:
    """The job's shards whose rows are not all written."""
    assert job.embedding_set_id is not None
    es = get_set(db, job.embedding_set_id)
    return unwritten(db, es.id, job_shards(job.params, es.n_items, es.importance_samples,
                                           base_rows))


def resume_stalled(db: Database, sender: TaskSender, stall_seconds: float,
                   base_rows: int) -> int:
    """Send what each stalled embedding attempt still owes, under its own lease owner:
    its unwritten shards, each on its own (not in a chord, whose count may be what was
    lost) and told to send the finishing step if its write leaves the job's rows
    complete; or, with every row written or a cancel asked, the finishing step itself.
    Duplicates are harmless: a shard whose rows are all written does no work, and one
    finishing step ends the job (the others find it ended). A job that cannot be served
    now (the broker or the database away) is nudged again `stall_seconds` later.
    Returns how many jobs were nudged."""
    nudged = 0
    for job in stalled_embeddings(db, stall_seconds):
        owner, set_id = job.lease_owner, job.embedding_set_id
        try:
            owed = [] if job.cancel_requested else owed_shards(db, job, base_rows)
            log.warning("embedding attempt stalled job_id=%d owner=%s: sending %s", job.id,
                        owner, f"{len(owed)} unwritten shard(s)" if owed
                        else "its finishing step")
            if not owed:
                sender.send_task(FINISH_TASK, [[], job.id, set_id, owner],
                                 queue=QUEUES["embed"], retry=False)
            for a, b in owed:
                sender.send_task(SHARD_TASK, [job.id, set_id, a, b, owner, True],
                                 queue=QUEUES["embed"], retry=False)
        except Exception as exc:  # nudged again stall_seconds from now
            log.warning("stalled job_id=%d not served this pass (%s: %s)", job.id,
                        type(exc).__name__, exc)
            continue
        nudged += 1
    return nudged
