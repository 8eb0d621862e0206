"""`latentbank up`: the whole service on one machine, from one supervising process that owns
the embedded servers and restarts any part that dies (docs/internals/architecture.md)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from service.cli.commands import beat_argv, worker_argv
from service.cli.parts import Child, Part
from service.cli.ports import port_free
from service.cli.running import LOCK_FILE, key_file, read_stack, stack_file
from store.settings import Settings

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per readiness poll


class StackError(Exception):
    """The stack cannot start; the message says why and what to do."""


@dataclass
class Stack:
    """The embedded stack; `start()` then `wait()`; `stop()` is safe at any point."""

    settings: Settings
    port: int
    worker_grace: float = 30.0
    say: Callable[[str], None] = print
    concurrency: int = 1
    url: str = ""
    admin_key: str = ""
    children: list[Child] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    _pg: Any = None
    _redis: Any = None
    _lock: IO[str] | None = None
    _stopping: threading.Event = field(default_factory=threading.Event)
    _db_url: str = ""
    _broker: str = ""

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir.resolve()

    def start(self) -> None:
        from migrations import migrate
        from store.errors import DatabaseUnavailable

        self.data_dir.mkdir(parents=True, exist_ok=True)
        # no one else may write where the CLI reads the URL and key (see read_stack)
        with contextlib.suppress(OSError):  # not ours: the CLI will not trust it anyway
            os.chmod(self.data_dir, self.data_dir.stat().st_mode & 0o755)
        self._take_lock()
        host = self.settings.api_host
        if not port_free(host, self.port):
            raise StackError(f"port {self.port} on {host} is in use; stop what listens there "
                             f"or choose another with `latentbank up --port N`")
        started = time.perf_counter()
        if self.settings.database_url:
            self._db_url = self.settings.database_url
        else:
            self.say(f"starting PostgreSQL+pgvector in {self.settings.postgres_dir}")
            self._add(self._postgres_part())
        try:
            migrate(self._db_url)
        except DatabaseUnavailable as exc:  # PgvectorMissing included
            raise StackError(str(exc)) from None
        if self.settings.redis_url:
            self._broker = self.settings.redis_url
        else:
            self.say(f"starting Redis in {self.settings.redis_socket.parent}")
            self._add(self._redis_part())
            self._broker = self.settings.broker_url
        self.admin_key = self._admin_key(self._db_url)
        env = {**os.environ, "LATENTBANK_DATA_DIR": str(self.data_dir),
               "LATENTBANK_DATABASE_URL": self._db_url, "LATENTBANK_REDIS_URL": self._broker,
               "LATENTBANK_ARTIFACTS": self.settings.artifacts_url,
               "PYTHONUNBUFFERED": "1"}
        logs = self.data_dir / "logs"
        worker = Child("worker", worker_argv(concurrency=self.concurrency,
                                             name=f"latentbank-up-{os.getpid()}@%h"),
                       env, logs / "worker.log")
        schedule = self.data_dir / "beat" / "schedule"
        beat = Child("beat", beat_argv(str(schedule)), env, logs / "beat.log")
        api = Child("api", [sys.executable, "-m", "uvicorn", "service.api.app:create_app",
                            "--factory", "--host", host, "--port", str(self.port),
                            "--log-level", "info", "--no-access-log",
                            "--timeout-graceful-shutdown", "5"],
                    env, logs / "api.log")
        self.url = f"http://{host}:{self.port}"
        for child in (worker, beat, api):
            self._add(self._child_part(child, schedule if child is beat else None))
        self._wait_ready(api, worker)
        for part in self.parts:
            part.check()
        self._write_state()
        log.info("stack up url=%s seconds=%.1f", self.url, time.perf_counter() - started)

    def _add(self, part: Part) -> None:
        part.start()
        self.parts.append(part)

    def _child_part(self, child: Child, schedule: Path | None) -> Part:
        def start() -> None:
            if schedule is not None:  # last-run times only: a fresh file is always safe
                schedule.parent.mkdir(parents=True, exist_ok=True)
                for old in schedule.parent.glob(schedule.name + "*"):
                    old.unlink()
            child.start()

        def health() -> str:
            if child.name == "api":
                answer = httpx.get(self.url + "/readyz", timeout=1.5)
                return "ok" if answer.status_code == 200 else f"not ready ({answer.text})"
            return "running"

        self.children.append(child)
        return Part(child.name, start, lambda: child.pid if child.running() else 0, health,
                    lambda: child.reap(0.0))

    def _redis_part(self) -> Part:
        from service.api.broker import broker_ping
        from service.cli.embedded.errors import EmbeddedError
        from service.cli.embedded.redis import start_embedded_redis, stop_embedded_redis

        def start() -> None:
            try:
                self._redis = start_embedded_redis(self.settings.redis_socket)
            except EmbeddedError as exc:  # not installed: say what to set instead
                raise StackError(str(exc)) from None

        def stop() -> None:
            if self._redis is not None:
                stop_embedded_redis(self._redis)

        def health() -> str:
            broker_ping(self.settings.broker_url, timeout=1.0)
            return "ok"

        return Part("redis", start, lambda: int(getattr(self._redis, "pid", 0) or 0), health,
                    stop)

    def _postgres_part(self) -> Part:
        from service.cli.embedded.errors import EmbeddedError
        from service.cli.embedded.postgres import (
            postmaster_pid,
            restart_embedded_postgres,
            start_embedded_postgres,
        )
        from store.db import ping

        directory = self.settings.postgres_dir

        def start() -> None:
            if self._pg is None:
                try:
                    self._pg, self._db_url = start_embedded_postgres(directory)
                except EmbeddedError as exc:  # refused, untouched: say what to do
                    raise StackError(str(exc)) from None
            else:
                restart_embedded_postgres(self._pg)

        def health() -> str:
            ping(self._db_url)
            return "ok"

        return Part("postgres", start, lambda: postmaster_pid(directory) or 0, health,
                    lambda: None, dead_after=3.0)

    def _take_lock(self) -> None:
        self._lock = open(self.data_dir / LOCK_FILE, "a+")  # noqa: SIM115 (held for life)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            self._lock = None
            running = read_stack(self.data_dir)
            where = f" at {running['url']} (pid {running['pid']})" if running else ""
            raise StackError(f"a latentbank stack already runs from {self.data_dir}{where}; "
                             "stop it first or use another LATENTBANK_DATA_DIR") from None

    def _admin_key(self, db_url: str) -> str:
        """The saved admin key while it stays valid, else a new one (saved, mode 0600)."""
        from store.db import Database
        from store.keys import create_key, verify_key

        path = key_file(self.data_dir)
        db = Database(db_url)
        try:
            if path.exists():
                saved = path.read_text().strip()
                row = verify_key(db, saved)
                if row is not None and "admin" in row.scopes:
                    return saved
                self.say(f"the key in {path} is no longer valid; creating a new admin key")
            created = create_key(db, "admin (latentbank up)", ["admin"])
        finally:
            db.dispose()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(created.key + "\n")
        os.chmod(path, 0o600)
        return created.key

    def _wait_ready(self, api: Child, worker: Child, timeout: float = 120.0) -> None:
        """Until the API answers /readyz and the worker has logged `ready.`."""
        deadline = time.monotonic() + timeout
        api_ready = worker_ready = False
        while not (api_ready and worker_ready):
            for child in self.children:
                if not child.running():
                    raise StackError(f"the {child.name} exited at start "
                                     f"(log {child.log_path}):\n{child.tail()}")
            if self._stopping.is_set():
                raise StackError("interrupted while starting")
            if time.monotonic() > deadline:
                late = "the API" if not api_ready else "the worker"
                raise StackError(f"{late} was not ready after {timeout:.0f} s "
                                 f"(logs in {api.log_path.parent})")
            if not api_ready:
                with contextlib.suppress(httpx.HTTPError):
                    api_ready = httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            if not worker_ready:
                worker_ready = "ready." in worker.tail(200)
            time.sleep(0.2)

    def _write_state(self) -> None:
        """`stack.json`, replaced atomically: the URL, the pids and each part's state."""
        state = {"url": self.url, "pid": os.getpid(), "data_dir": str(self.data_dir),
                 "logs": str(self.data_dir / "logs"),
                 "checked_at": time.time(),
                 "parts": {p.name: p.describe() for p in self.parts}}
        for part in self.parts:  # kept for older readers
            state[f"{part.name}_pid"] = part.pid()
        tmp = stack_file(self.data_dir).with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # whatever the umask, or a left-over file, said
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2))
        os.replace(tmp, stack_file(self.data_dir))

    def wait(self, tick: float = 0.5, health_every: float = 3.0) -> int:
        """Supervise until SIGINT/SIGTERM: restart what dies, refresh the state file.
        Returns the exit status (0)."""
        next_health = time.monotonic() + health_every
        while not self._stopping.wait(tick):
            # the database first: the others need it to start
            for part in sorted(self.parts, key=lambda p: p.name != "postgres"):
                part.watch(self.say)
            if time.monotonic() >= next_health:
                for part in self.parts:
                    part.check()
                self._write_state()
                next_health = time.monotonic() + health_every
        return 0

    def request_stop(self, *_: Any) -> None:
        self._stopping.set()

    def stop(self) -> None:
        """Stop every part this process started: API, beat, worker, broker, database."""
        # All children at once: a submission that reaches the API meanwhile is kept in the
        # jobs table and published again at the next start.
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.reap(10.0 if child.name != "worker" else self.worker_grace)
        self.children.clear()
        with contextlib.suppress(OSError):
            info = json.loads(stack_file(self.data_dir).read_text())
            if info.get("pid") == os.getpid():
                stack_file(self.data_dir).unlink()
        if self._redis is not None:
            from service.cli.embedded.redis import stop_embedded_redis

            stop_embedded_redis(self._redis)
            self._redis = None
        if self._pg is not None:
            from service.cli.embedded.postgres import stop_embedded_postgres

            stop_embedded_postgres(self._pg, self.settings.postgres_dir)
            self._pg = None
        self.parts.clear()
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def run_up(settings: Settings, port: int, worker_grace: float,
           say: Callable[[str], None], concurrency: int = 1,
           show_key: bool | None = None) -> int:
    """Start, print where to find it, supervise until a signal, stop. Returns the exit
    status. The admin key is printed only when `show_key` (default: stdout is a
    terminal); it is always in `DATA_DIR/admin.key` (mode 0600)."""
    stack = Stack(settings, port, worker_grace, say, concurrency)
    previous = {s: signal.signal(s, stack.request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack.start()
        except StackError as exc:
            say(f"error: {exc}")
            return 1
        say(f"latentbank is up at {stack.url}  (API docs: {stack.url}/docs)")
        say(f"web UI: {stack.url}/ui/  (sign in with the admin key)")
        # a terminal shows it; a redirected output (a log file) must not keep it
        show = sys.stdout.isatty() if show_key is None else show_key
        say(f"admin API key: {stack.admin_key if show else '(not printed: not a terminal)'}")
        say(f"  saved in {key_file(stack.data_dir)} (mode 0600); the CLI on this machine "
            "uses it")
        say(f"  logs in {stack.data_dir / 'logs'}; `latentbank status` shows each part; "
            "Ctrl-C stops everything")
        status = stack.wait()
        say("stopping...")
        return status
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
