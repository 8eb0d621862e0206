"""The `latentbank` command line."""

import subprocess
import sys

from sqlalchemy import create_engine, inspect

from tests.support import SYSTEM_PG, system_pg_up


def run_cli(*args, env=None):
    import os

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "service.cli", *args],
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


def test_keys_create_direct_prints_a_key_the_api_accepts(api, api_env):
    import httpx

    out = run_cli("keys", "create", "--name", "cli", "--scope", "read", "--direct", env=api_env)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("lb_") and "not shown again" in out.stderr
    with httpx.Client(base_url=api.url) as c:
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        answer = c.post("/v1/datasets", json={"name": "x", "builtin": "digits"},
                        headers={"Authorization": f"Bearer {key}"})
        assert answer.status_code == 403
    bad = run_cli("keys", "create", "--name", "cli", "--scope", "root", "--direct", env=api_env)
    assert bad.returncode == 2 and "scopes must be" in bad.stderr


def test_api_command_serves_until_terminated(api_env, tmp_path):
    import os
    import time

    import httpx

    from tests.support import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "api", "--port",
         str(port)], env={**os.environ, **api_env}, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "api.log", "w"))  # noqa: SIM115
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()
                time.sleep(0.3)
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    finally:
        proc.terminate()
        # uvicorn shuts down cleanly, then re-raises SIGTERM (exit status -15)
        assert proc.wait(timeout=30) in (0, -15)
    assert "Application shutdown complete" in (tmp_path / "api.log").read_text()


def test_the_servers_commands_go_without_the_client_distribution():
    """The images install no latentbank-client: the server's commands never import it
    (the client verbs do, when they run), and a client verb without it says what to
    install."""
    code = """
import sys
import service.cli.main
from typer.testing import CliRunner
assert "latentbank_client" not in sys.modules, "imported with the CLI"
sys.modules["latentbank_client"] = None  # as where it is not installed
runner = CliRunner()
for argv in (["version"], ["worker", "--help"], ["up", "--help"], ["migrate", "--help"]):
    result = runner.invoke(service.cli.main.app, argv)
    assert result.exit_code == 0, (argv, result.output)
result = runner.invoke(service.cli.main.app, ["models", "list"])
print(result.exit_code, result.output.strip())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ("2 error: the client verbs need the latentbank-client "
                                  "package: pip install ./clients/python")
