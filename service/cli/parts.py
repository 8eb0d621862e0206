"""The supervisor's parts: a child process in a session of its own, and the restart policy
(back-off, confirmed deaths, health) that `latentbank up` applies to each of its five."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from store.processes import pid_alive

log = logging.getLogger(__name__)


try:  # loaded once here: the child between fork and exec must not import or load
    _LIBC: Any = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:
    _LIBC = None


def _die_with_parent() -> None:
    """Linux: a child gets SIGTERM if the supervisor dies (even by SIGKILL)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


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
