"""The periodic maintenance pass (beat's `latentbank.maintenance` task): requeue jobs whose
attempt is gone, publish jobs never sent, repair index builds, drop the partitions deleted
sets left behind; one pass at a time."""

from __future__ import annotations

import logging

from store.db import Database
from store.indexes import fail_index, release_index, stuck_indexes
from store.partitions import drop_partitions, orphan_partitions
from store.publishing import TaskSender, publish, publish_index
from store.recovery import maintenance_lock, requeue_lost, unpublished_jobs
from workers.lease import owner_is_dead
from workers.shards import resume_stalled

log = logging.getLogger(__name__)


def run_maintenance(db: Database, sender: TaskSender, republish_seconds: float | None = None,
                    index_max_attempts: int = 3, grace_seconds: float = 10.0,
                    stall: tuple[float, int] | None = None) -> dict[str, int]:
    """One pass. Returns how many jobs were requeued and published, how many stalled
    embedding attempts were sent what they owe (with `stall`: the seconds without a
    heartbeat that make one stalled, and the settings' shard rows), and how many index
    builds were sent again or marked failed (-1: another pass holds the lock)."""
    with maintenance_lock(db) as taken:
        if not taken:
            return {"requeued": -1, "published": -1, "stalled": -1, "indexes_sent": -1,
                    "indexes_failed": -1}
        requeued = requeue_lost(db, owner_is_dead)
        for job_id in requeued:
            log.warning("requeued job_id=%d: its attempt is gone", job_id)
        jobs = unpublished_jobs(db, grace_seconds, republish_seconds)
        published = 0
        for job in jobs:
            log.info("publishing job job_id=%d kind=%s attempts=%d", job.id, job.kind,
                     job.attempts)
            published += publish(db, sender, job)
        stalled = resume_stalled(db, sender, *stall) if stall else 0
        sent, failed = repair_indexes(db, sender, republish_seconds, index_max_attempts,
                                      grace_seconds)
        orphans = orphan_partitions(db)
        if orphans:
            log.warning("dropping the partitions of deleted sets set_ids=%s", orphans)
            drop_partitions(db, orphans)
        return {"requeued": len(requeued), "published": published, "stalled": stalled,
                "indexes_sent": sent, "indexes_failed": failed}


def repair_indexes(db: Database, sender: TaskSender, republish_seconds: float | None,
                   max_attempts: int, grace_seconds: float = 10.0) -> tuple[int, int]:
    """Send again the index task of every set stuck `building` with no live build, or mark
    its index failed once `max_attempts` builds started. Returns (sent, failed)."""
    sent = failed = 0
    for es in stuck_indexes(db, owner_is_dead, grace_seconds, republish_seconds):
        if es.index_attempts >= max_attempts:
            reason = (f"gave up after {es.index_attempts} attempt(s): the worker building "
                      "the index stopped without finishing (crash, kill, lost host or "
                      "database)")
            if fail_index(db, es.id, reason, es.index_owner):
                log.warning("index of set_id=%d marked failed: %s", es.id, reason)
                failed += 1
            continue
        if es.index_owner is not None and not release_index(db, es.id, es.index_owner):
            continue  # the build moved on meanwhile
        log.warning("sending the index build of set_id=%d again (attempts=%d, owner=%s)",
                    es.id, es.index_attempts, es.index_owner)
        sent += publish_index(db, sender, es.id)
    return sent, failed
