"""The command lines of a worker and of beat: written once, run by `latentbank worker` /
`latentbank beat`, by `latentbank up`'s supervisor, and by the tests and benchmarks.

The CLI starts the worker as a program (`celery -A workers.app`): it imports nothing of
`workers/`, so neither Celery's task code nor torch loads here.
"""

from __future__ import annotations

import shutil
import sys

from store.publishing import WORKER_QUEUES


def default_pool() -> str:
    """CUDA cannot start in forked children: GPU hosts run the solo pool."""
    return "solo" if shutil.which("nvidia-smi") else "prefork"


def worker_argv(queues: str = WORKER_QUEUES, concurrency: int = 1, pool: str = "auto",
                name: str = "latentbank@%h", loglevel: str = "INFO") -> list[str]:
    """`celery -A workers.app worker ...` with this interpreter. Gossip and mingle are off:
    the jobs table, not worker-to-worker chatter, coordinates the work (and start-up is
    seconds faster)."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues,
            "-P", default_pool() if pool == "auto" else pool, "-c", str(concurrency),
            "-n", name, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def beat_argv(schedule: str, loglevel: str = "INFO") -> list[str]:
    """`celery -A workers.app beat`: the maintenance schedule, its state in `schedule`."""
    return [sys.executable, "-m", "celery", "-A", "workers.app", "beat", "--schedule",
            schedule, "--pidfile=", "--loglevel", loglevel]
