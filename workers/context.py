"""Per-process resources of a worker: settings, database, artifact store, the sender the
orchestrators publish through, and caches; each pool process makes its own."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from celery.signals import worker_process_init

from store.artifacts import ArtifactStore
from store.db import Database, database_url
from store.settings import Settings, get_settings, open_artifacts
from workers.app import app
from workers.sender import Sender, WorkerSender


@dataclass
class Context:
    settings: Settings
    db: Database
    artifacts: ArtifactStore
    pid: int
    cache: dict[str, Any] = field(default_factory=dict)
    sender: Sender = field(default_factory=lambda: WorkerSender(app))


_context: Context | None = None


def context() -> Context:
    """This process's context, created on first use (and again after a fork)."""
    global _context
    if _context is None or _context.pid != os.getpid():
        settings = get_settings()
        _context = Context(settings, Database(database_url(settings), pool_size=2),
                           open_artifacts(settings), os.getpid())
    return _context


def reset_context() -> None:
    """Forget connections inherited from a parent process (never close them: the parent
    still uses them)."""
    global _context
    if _context is not None:
        _context.db.engine.dispose(close=False)
    _context = None


@worker_process_init.connect
def _per_process(**_: object) -> None:
    """In each pool process: its own database connections and a share of the cores."""
    reset_context()
    concurrency = int(os.environ.get("LATENTBANK_WORKER_CONCURRENCY", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, concurrency)))
