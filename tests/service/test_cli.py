"""The `latentbank` command line."""

import subprocess
import sys

from sqlalchemy import create_engine, inspect

from tests.store.test_migrations import SYSTEM_PG, system_pg_up


def run_cli(*args, env=None):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", "from service.cli import main; main()", *args],
                          capture_output=True, text=True, env=full_env, timeout=120)


def test_version():
    out = run_cli("version")
    assert out.returncode == 0 and out.stdout.strip() == "0.1.0"


def test_migrate_upgrades_the_configured_database(new_database):
    url = new_database("cli")
    out = run_cli("migrate", env={"LATENTBANK_DATABASE_URL": url})
    assert out.returncode == 0, out.stderr
    assert "is at revision head" in out.stdout
    engine = create_engine(url)
    assert "latents" in inspect(engine).get_table_names()
    engine.dispose()


def test_migrate_refuses_postgres_without_pgvector():
    if not system_pg_up():
        import pytest

        pytest.skip("no PostgreSQL on 127.0.0.1:5432")
    out = run_cli("migrate", env={"LATENTBANK_DATABASE_URL": SYSTEM_PG})
    assert out.returncode == 2
    assert "has no pgvector extension" in out.stderr
    assert "Traceback" not in out.stderr and "secret-password" not in out.stderr
