"""A primary and its streaming replica, both run by the embedded server's own binaries: the
primary started as `latentbank up` starts it (pgserver, every role with a password), the
replica cloned from it by `pg_basebackup` and started as a hot standby (`standby.signal`,
`primary_conninfo` over the primary's socket). What the tests of read replicas run on."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from service.cli.embedded.postgres import start_embedded_postgres, stop_embedded_postgres
from store.db import EMBEDDED_APP_ROLE, EMBEDDED_SUPERUSER, embedded_password


class StreamingPair:
    def __init__(self, root: Path) -> None:
        self.primary_dir = root / "primary"
        self.server, self.primary_url = start_embedded_postgres(self.primary_dir)
        self.bin = Path(self.server.bin_path)
        self.user = self.server.system_user  # pgserver's own user when run as root
        self.primary_socket = str(self.server.get_postmaster_info().socket_dir)
        self.replica_dir = root / "replica"
        # a short folder of its own for the replica's socket (a socket path has 107 bytes)
        self.replica_socket = tempfile.mkdtemp(prefix="lb-replica-")
        os.chmod(self.replica_socket, 0o777)
        if self.user is not None:
            os.chmod(root, 0o777)
            for folder in (root, *root.parents):
                os.chmod(folder, os.stat(folder).st_mode | 0o055)
        password = embedded_password(self.primary_dir, EMBEDDED_SUPERUSER)
        conninfo = (f"host={self.primary_socket} user={EMBEDDED_SUPERUSER} "
                    f"password={password} application_name=lb-test-replica")
        self._pg("pg_basebackup", "-D", str(self.replica_dir), "-d", conninfo, "-X", "stream",
                 "-c", "fast", "-R")
        with open(self.replica_dir / "postgresql.auto.conf", "a") as conf:
            conf.write(f"primary_conninfo = '{conninfo}'\nhot_standby_feedback = on\n")
        self.start_replica()
        self.replica_url = self.replica_url_of(EMBEDDED_APP_ROLE)

    def replica_url_of(self, role: str) -> str:
        """The SQLAlchemy URL of `role` on the replica (roles and passwords are the
        primary's: they reach it through replication)."""
        password = quote(embedded_password(self.primary_dir, role) or "", safe="")
        return f"postgresql+psycopg://{role}:{password}@/postgres?host={self.replica_socket}"

    def _pg(self, program: str, *args: str) -> str:
        done = subprocess.run([str(self.bin / program), *args], capture_output=True, text=True,
                              user=self.user, timeout=120, check=False,
                              cwd="/")
        if done.returncode != 0:
            raise RuntimeError(f"{program} failed: {done.stderr.strip()[-800:]}")
        return done.stdout

    def start_replica(self) -> None:
        self._pg("pg_ctl", "-D", str(self.replica_dir), "-l", str(self.replica_dir / "log"),
                 "-w", "-t", "60", "-o", f'-h "" -k {self.replica_socket}', "start")

    def stop_replica(self) -> None:
        self._pg("pg_ctl", "-D", str(self.replica_dir), "-m", "fast", "-w", "stop")

    def stop_primary(self) -> None:
        self._pg("pg_ctl", "-D", str(self.primary_dir), "-m", "fast", "-w", "stop")

    def start_primary(self) -> None:
        self._pg("pg_ctl", "-D", str(self.primary_dir), "-l", str(self.primary_dir / "log"),
                 "-w", "-t", "60", "-o", f'-h "" -k {self.primary_socket}', "start")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop_replica()
        stop_embedded_postgres(self.server, self.primary_dir)
