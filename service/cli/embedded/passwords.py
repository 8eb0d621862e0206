"""Every connection to the embedded PostgreSQL proves its role's password: the saved
passwords, a pg_hba.conf that trusts no one, and the roles' least privileges."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service.cli.embedded.errors import EmbeddedError
from store.db import (
    EMBEDDED_APP_ROLE,
    EMBEDDED_SUPERUSER,
    embedded_password,
    embedded_secrets_dir,
    embedded_url,
)


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
# Rewritten by latentbank (service/cli/embedded/passwords.py) whenever a line here trusts a client.
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


def write_hba(directory: Path) -> None:
    replace_file(directory / "pg_hba.conf",
                 _HBA.format(secrets=embedded_secrets_dir(directory)), mode=0o600)


def replace_file(path: Path, text: str, *, mode: int | None = None,
                 like: Path | None = None) -> None:
    """Write a server file whole (a temp file in its folder, fsync, rename: a crash leaves
    the old or the new), with `mode` (else the mode of `like`, by default the file
    replaced) and, when we run as root, the owner of `like` (pgserver's own user)."""
    import contextlib
    import tempfile

    try:
        model = (like or path).stat()
    except FileNotFoundError:
        model = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode if mode is not None
                 else model.st_mode & 0o777 if model is not None else 0o600)
        if model is not None and os.geteuid() == 0:
            os.chown(tmp, model.st_uid, model.st_gid)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def set_superuser_password_offline(server: Any, directory: Path, password: str) -> None:
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
                                 lambda: write_hba(directory))
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
