"""Engines, sessions, the pgvector check, and how to tell an outage from an error (the
embedded server is started by `service.cli.embedded`, the schema upgraded by `migrations`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from pgvector.psycopg import register_vector
from psycopg.errors import QueryCanceled
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from store.errors import (
    DatabaseOutage,
    DatabaseUnavailable,
    InvalidInput,
    NotFound,
    PgvectorMissing,
    StatementTimeout,
    StoreError,
)
from store.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

PGVECTOR_HELP = (
    "Install the pgvector extension on that server (Debian/Ubuntu: apt install "
    "postgresql-<version>-pgvector; Docker: the pgvector/pgvector image), or unset "
    "LATENTBANK_DATABASE_URL to use the embedded PostgreSQL with pgvector (pgserver).")


def sqlalchemy_url(url: str) -> str:
    """Use the psycopg 3 driver for plain `postgresql://` URLs."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


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
                "SELECT a.default_version, a.installed_version IS NOT NULL, r.rolsuper, "
                "coalesce(v.trusted, false), current_user, current_database() "
                "FROM pg_available_extensions a "
                "JOIN pg_roles r ON r.rolname = current_user "
                "LEFT JOIN pg_available_extension_versions v "
                "ON v.name = a.name AND v.version = a.default_version "
                "WHERE a.name = 'vector'")).first()
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "no answer"
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {where}: {reason}") from None
    if row is None:
        raise PgvectorMissing(
            f"PostgreSQL at {where} has no pgvector extension ('vector' is not among its "
            f"available extensions); latentbank stores latents as pgvector vectors. "
            f"{PGVECTOR_HELP}")
    version, created, superuser, trusted, user, database = row
    if not (created or superuser or trusted):  # the app role of least privilege
        raise PgvectorMissing(
            f"pgvector is available on PostgreSQL at {where} but not created in database "
            f"{database!r}, and role {user!r} may not create it (pgvector is not a trusted "
            f"extension): have an administrator run `CREATE EXTENSION vector;` in that "
            f"database once, then migrate again")
    return str(version)


def connectable_databases(url: str) -> list[str]:
    """The names of the server's databases that accept connections."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.begin() as conn:
            return list(conn.execute(text(
                "SELECT datname FROM pg_database WHERE datallowconn")).scalars())
    finally:
        engine.dispose()


def update_pgvector(url: str) -> bool:
    """`ALTER EXTENSION vector UPDATE` in the database at `url`, if it has the extension
    (after a server upgrade: the catalog then names the old version). True if it did."""
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.begin() as conn:
            if conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")
                            ).first() is None:
                return False
            conn.execute(text("ALTER EXTENSION vector UPDATE"))
            return True
    finally:
        engine.dispose()


def check_alive(db: Database) -> None:
    """`SELECT 1` through the pool; raises unless the database answers."""
    with db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def ping(url: str, timeout: int = 2) -> None:
    """Connect and run `SELECT 1` once (no pool); raises unless the database answers."""
    with psycopg.connect(sqlalchemy_url(url).replace("postgresql+psycopg://", "postgresql://"),
                         connect_timeout=timeout) as conn:
        conn.execute("SELECT 1")


def is_transient(exc: BaseException) -> bool:
    """A failure of the connection to the database (restart, outage, network), which a
    retry may outlive, as opposed to an error of the statement or its data."""
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


# The embedded server's roles: the service's own (owns the database `postgres` and its
# schemas, not superuser) and the superuser, used only to set the server up. Each logs in
# with a password (SCRAM-SHA-256) kept in a file of its own beside the data folder.
EMBEDDED_APP_ROLE = "latentbank"
EMBEDDED_SUPERUSER = "postgres"


def embedded_secrets_dir(pgdata: Path) -> Path:
    """Where the embedded server's passwords are kept: `DATA_DIR/postgres-secrets` for
    `DATA_DIR/postgres` (mode 0700; `<role>.password`, mode 0600). Beside the data folder,
    not in it: `upgrade-db` replaces the data folder and keeps these."""
    return pgdata.with_name(pgdata.name + "-secrets")


def embedded_password(pgdata: Path, role: str) -> str | None:
    """The saved password of `role` on the embedded server of `pgdata`, or None."""
    try:
        return (embedded_secrets_dir(pgdata) / f"{role}.password").read_text().strip() or None
    except FileNotFoundError:
        return None


def embedded_url(pgdata: Path, socket_dir: Path | str, role: str = EMBEDDED_APP_ROLE,
                 database: str = "postgres") -> str:
    """The SQLAlchemy URL of `role` on the embedded server of `pgdata` (its socket in
    `socket_dir`), with the saved password. Never log it: use `redacted`."""
    from urllib.parse import quote

    password = embedded_password(pgdata, role)
    if password is None:
        raise DatabaseUnavailable(
            f"no password for the embedded database's role {role!r} in "
            f"{embedded_secrets_dir(pgdata)}; start the stack with `latentbank up`, which "
            f"makes it")
    return (f"postgresql+psycopg://{role}:{quote(password, safe='')}@/{database}"
            f"?host={socket_dir}")


def database_url(settings: Settings) -> str:
    """The configured URL; with none set, the embedded server's (which must be running),
    as the service's own role."""
    if settings.database_url:
        return sqlalchemy_url(settings.database_url)
    socket_dir = settings.postgres_dir
    if not (socket_dir / "postmaster.pid").exists():
        raise DatabaseUnavailable(
            f"LATENTBANK_DATABASE_URL is not set and no embedded PostgreSQL runs in "
            f"{socket_dir}; start the stack with `latentbank up` or set the URL")
    return embedded_url(socket_dir, socket_dir)


def get_row(db: Database, table: type[T], row_id: int, what: str) -> T:
    """The row of `table` with id `row_id`; NotFound("<what> <id> does not exist")."""
    with db.session() as s:
        row = s.get(table, row_id)
        if row is None:
            raise NotFound(f"{what} {row_id} does not exist")
        return row


def narrowed(query: Any, filters: dict[Any, Any]) -> Any:
    """`query` narrowed by `column == value` for each value in `filters` that is set."""
    for column, value in filters.items():
        if value is not None:
            query = query.where(column == value)
    return query


def statement_timeout(ms: int) -> dict[str, str]:
    """Connection arguments that make the server cancel any statement of the connection
    after `ms` milliseconds (0: none). Set at connect time (libpq `options`), so it holds
    for every session of the pool; a cancelled statement raises QueryCanceled."""
    return {"options": f"-c statement_timeout={int(ms)}"} if ms > 0 else {}


def is_statement_timeout(exc: BaseException) -> bool:
    """The server cancelled the statement for its `statement_timeout` (SQLSTATE 57014)."""
    orig = getattr(exc, "orig", exc)
    return getattr(orig, "sqlstate", None) == "57014"


def analyze(db: Database, table: str, vacuum: bool = False) -> None:
    """Refresh planner statistics after a bulk load (else plans assume a tiny table):
    `items`, or one set's partition of `latents` (`latents_set_<id>`). With `vacuum`,
    VACUUM (ANALYZE): also sets the rows' hint bits and the visibility map in one pass,
    which autovacuum would otherwise do later, at a time of its choosing (after a bulk
    insert it reads and rewrites the whole table)."""
    if table != "items" and re.fullmatch(r"latents_set_[0-9]+", table) is None:
        raise ValueError(table)
    with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f"{'VACUUM (ANALYZE)' if vacuum else 'ANALYZE'} {table}"))


def _register_vector(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    """At checkout, once per connection: pgvector's types for psycopg, so a `vector` comes
    back as a `pgvector.Vector` (float32). Retried at the next checkout while the database
    has no `vector` type yet (before the first migration creates the extension)."""
    if record.info.get("vector"):
        return
    try:
        register_vector(dbapi_connection)
    except psycopg.Error:  # "vector type not found", or the server went away: the
        return             # statement that follows fails through SQLAlchemy if it is gone
    record.info["vector"] = True


def binary_rows(conn: Connection, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The rows of `sql` (psycopg's `%(name)s` placeholders) in PostgreSQL's binary format,
    so a `vector` arrives as its float32 bytes (a `pgvector.Vector`), never as text. The
    driver's errors come wrapped as SQLAlchemy's would be (store_error_of reads them)."""
    try:
        with conn.connection.driver_connection.cursor(binary=True) as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall()
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql, params, exc, psycopg.Error) from exc


def is_unavailable(exc: BaseException) -> bool:
    """`is_transient`, or no connection of the pool came free within its timeout."""
    return is_transient(exc) or isinstance(exc, PoolTimeout)


# The driver's and the pool's errors that `store_error_of` gives a meaning to: a COPY's
# cancellation comes from the driver's own cursor, the rest through SQLAlchemy.
DRIVER_ERRORS: tuple[type[Exception], ...] = (QueryCanceled, DBAPIError, PoolTimeout)


def store_error_of(exc: BaseException) -> StoreError | None:
    """What a driver or pool error means to the service, as a store error whose cause is
    `exc`; None for an error of the statement itself (a bug)."""
    found: StoreError | None = None
    if isinstance(exc, QueryCanceled | OperationalError | PoolTimeout):
        found = (StatementTimeout("the statement ran past its statement_timeout")
                 if is_statement_timeout(exc) else
                 DatabaseOutage("the database is unavailable; try again shortly"))
    elif isinstance(exc, DataError):  # a value the database refused: the request's fault
        found = InvalidInput("a value in the request is out of range or malformed")
    elif isinstance(exc, DBAPIError) and exc.connection_invalidated:
        found = DatabaseOutage("the database is unavailable; try again shortly")
    if found is not None:
        found.__cause__ = exc
    return found


def unbounded(session: Session) -> None:
    """Lift the connection's statement timeout for the rest of `session`'s transaction: for
    a delete whose cascade is as large as the data it removes (bounded by the upload
    limits, not by the request), which would otherwise be cancelled on large data."""
    session.execute(text("SET LOCAL statement_timeout = 0"))


class Database:
    """An engine plus a session factory; one per process."""

    def __init__(self, url: str, **engine_kwargs: Any) -> None:
        self.url = sqlalchemy_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        event.listen(self.engine, "checkout", _register_vector)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessions.begin() as session:
            yield session

    def pgvector(self) -> tuple[int, ...]:
        """The pgvector version installed in this database, e.g. (0, 8, 5); (0,) when the
        extension is not installed. Read once per process (an upgrade needs a restart)."""
        found = getattr(self, "_pgvector", None)
        if found is None:
            with self.engine.connect() as conn:
                version = conn.execute(text(
                    "SELECT extversion FROM pg_extension WHERE extname = 'vector'")).scalar()
            found = tuple(int(p) for p in re.findall(r"[0-9]+", version or "0")[:3])
            self._pgvector = found
        return found

    def dispose(self) -> None:
        self.engine.dispose()
