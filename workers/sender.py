"""How the orchestrators publish: tasks by name through a sender they are handed, so they
never import the tasks they chain (and a test hands them a fake)."""

from __future__ import annotations

from typing import Any, Protocol

from celery import Celery, chord

from store.publishing import TaskSender

SHARD_TASK = "latentbank.embed_shard"
FINISH_TASK = "latentbank.embed_finish"
RELEASE_TASK = "latentbank.release_attempt"
Call = tuple[str, list[Any]]  # a task's name and its arguments


class Sender(TaskSender, Protocol):
    """A TaskSender that also sends a chord: the header's tasks, then the body with their
    results prepended to its arguments."""

    def send_chord(self, header: list[Call], body: Call) -> Any: ...


class WorkerSender:
    """The worker's Sender: its own Celery app."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def send_task(self, name: str, args: Any = None, **options: Any) -> Any:
        return self.app.send_task(name, args, **options)

    def send_chord(self, header: list[Call], body: Call) -> Any:
        tasks = [self.app.signature(name, args=args, immutable=True) for name, args in header]
        return chord(tasks, self.app.signature(body[0], args=body[1])).apply_async()
