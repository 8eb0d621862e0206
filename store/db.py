"""Engines, sessions, the embedded PostgreSQL, the pgvector check and migrations."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from store.errors import DatabaseUnavailable, PgvectorMissing
from store.settings import Settings

log = logging.getLogger(__name__)

PGVECTOR_HELP = (
    "Install the pgvector extension on that server (Debian/Ubuntu: apt install "
    "postgresql-<version>-pgvector; Docker: the pgvector/pgvector image), or unset "
    "LATENTBANK_DATABASE_URL to use the embedded PostgreSQL with pgvector (pgserver).")


def sqlalchemy_url(url: str) -> str:
    """Use the psycopg 3 driver for plain `postgresql://` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


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


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with pre-ping (a restarted database does not break the pool)."""
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    return create_engine(sqlalchemy_url(url), **kwargs)


def redacted(url: str) -> str:
    return make_url(sqlalchemy_url(url)).render_as_string(hide_password=True)


def check_database(engine: Engine) -> str:
    """Refuse to go on unless the database answers and offers pgvector.

    Returns the pgvector version available. Raises DatabaseUnavailable or
    PgvectorMissing with a message that says how to fix it.
    """
    where = redacted(engine.url.render_as_string(hide_password=False))
    try:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            )).first()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "no answer"
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {where}: {reason}") from None
    if row is None:
        raise PgvectorMissing(
            f"PostgreSQL at {where} has no pgvector extension ('vector' is not among its "
            f"available extensions); latentbank stores latents as pgvector vectors. "
            f"{PGVECTOR_HELP}")
    return str(row[0])


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    import migrations

    cfg = Config()
    cfg.set_main_option("script_location", os.path.dirname(migrations.__file__))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Check the database, then upgrade it to `revision` (idempotent)."""
    from alembic import command

    engine = make_engine(url)
    try:
        check_database(engine)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), revision)


def ping(url: str, timeout: int = 2) -> None:
    """Connect and run `SELECT 1` once (no pool); raises unless the database answers."""
    import psycopg

    with psycopg.connect(sqlalchemy_url(url).replace("postgresql+psycopg://", "postgresql://"),
                         connect_timeout=timeout) as conn:
        conn.execute("SELECT 1")


def is_transient(exc: BaseException) -> bool:
    """A failure of the connection to the database (restart, outage, network), which a
    retry may outlive, as opposed to an error of the statement or its data."""
    import psycopg
    from sqlalchemy.exc import DBAPIError, InterfaceError
    from sqlalchemy.exc import OperationalError as SAOperationalError

    if isinstance(exc, DatabaseUnavailable) and not isinstance(exc, PgvectorMissing):
        return True
    if isinstance(exc, SAOperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    # raw driver errors (COPY runs on the driver's own cursor)
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def database_url(settings: Settings) -> str:
    """The configured URL; with none set, the embedded server's (which must be running)."""
    if settings.database_url:
        return sqlalchemy_url(settings.database_url)
    socket_dir = settings.postgres_dir
    if not (socket_dir / "postmaster.pid").exists():
        raise DatabaseUnavailable(
            f"LATENTBANK_DATABASE_URL is not set and no embedded PostgreSQL runs in "
            f"{socket_dir}; start the stack with `latentbank up` or set the URL")
    return f"postgresql+psycopg://postgres:@/postgres?host={socket_dir}"


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = sqlalchemy_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
