"""How a job's task reaches the broker: the task and queue names, and the one way to send
a task and record that it was sent (a broker failure leaves the job for a later pass)."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from sqlalchemy import text, update

from store.db import Database
from store.tables import EmbeddingSet, Job

log = logging.getLogger(__name__)
TASKS = {"train": "latentbank.train", "embed": "latentbank.embed",
         "ingest": "latentbank.ingest"}
INDEX_TASK = "latentbank.embed_index"  # a ready set's HNSW index (workers.tasks.embed_index)
QUEUES = {"train": "train", "embed": "embed", "ingest": "ingest",
          "maintenance": "maintenance"}
WORKER_QUEUES = ",".join(QUEUES.values())  # what a worker consumes by default


class TaskSender(Protocol):
    """What publishes a task: a Celery app (`service.api.broker.task_sender`, or the worker's)."""

    def send_task(self, name: str, args: Any = ..., **options: Any) -> Any: ...


def publish(db: Database, sender: TaskSender, job: Job) -> bool:
    """Send a queued job's task, then record that it was sent. The one way a job's task
    reaches the broker: the API calls it right after a submission commits, the
    maintenance pass for jobs never sent (the broker was down) or requeued.

    A broker failure is logged and returns False: the job row is committed already and
    stays unpublished, so a later maintenance pass sends it. Sending twice is harmless
    (the claim lets one delivery run)."""
    try:
        sender.send_task(TASKS[job.kind], args=[job.id], queue=QUEUES[job.kind], retry=False)
    except Exception as exc:  # any broker failure
        log.warning("broker unavailable; job_id=%d stays queued until a later pass (%s)",
                    job.id, type(exc).__name__)
        return False
    with db.session() as s:
        s.execute(update(Job).where(Job.id == job.id).values(published_at=text("now()")))
    return True


def publish_index(db: Database, sender: TaskSender, set_id: int) -> bool:
    """Send the index task of a set owed one (`store.indexes.index_owed`), then record
    that it was sent: the worker that made the set ready right after that commit, the
    maintenance pass for sets whose task never came (`store.indexes.stuck_indexes`). A
    broker failure returns False and leaves the set owed; sending twice is harmless (one
    build claims the set)."""
    try:
        sender.send_task(INDEX_TASK, args=[set_id], queue=QUEUES["embed"], retry=False)
    except Exception as exc:  # any broker failure
        log.warning("broker unavailable; the index of set_id=%d waits for a later pass (%s)",
                    set_id, type(exc).__name__)
        return False
    with db.session() as s:
        s.execute(update(EmbeddingSet).where(EmbeddingSet.id == set_id)
                  .values(index_sent_at=text("now()")))
    return True
