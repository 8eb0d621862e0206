"""The `latentbank` command line."""

import subprocess
import sys

import pytest
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


@pytest.mark.stack  # starts uvicorn itself
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


# The commands that run without latentbank-client (the images' own); every other command
# of the app is a client verb. A new command must be put in one group or the other.
SERVER_COMMANDS = {"version", "migrate", "worker", "beat", "status", "api", "upgrade-db",
                   "sql-role", "sql", "up", "mlflow sync"}


def test_without_the_client_distribution_every_client_verb_says_what_to_install(tmp_path):
    """The images install no latentbank-client: the server's commands never import it,
    and every client verb (each command of the app but the server's, enumerated from the
    typer app: `datasets add` and `demo` included), given arguments that parse, exits 2
    with one line naming what to install, before anything else (no traceback)."""
    (tmp_path / "1").write_text("")  # "1": an id, an alias-free ref, a name, a file
    code = """
import sys
import typer.main
import service.cli.main
from typer.testing import CliRunner
from tests.service.cli.test_main import SERVER_COMMANDS
assert "latentbank_client" not in sys.modules, "imported with the CLI"
sys.modules["latentbank_client"] = None  # as where it is not installed
runner = CliRunner()
app = service.cli.main.app

def walk(command, path=()):
    subs = getattr(command, "commands", None)
    if subs:
        for name, sub in subs.items():
            yield from walk(sub, (*path, name))
    else:
        yield path, command

commands = dict(walk(typer.main.get_command(app)))
assert SERVER_COMMANDS <= {" ".join(p) for p in commands}, "a server command is gone"
verbs = [p for p in commands if " ".join(p) not in SERVER_COMMANDS]
assert {("datasets", "add"), ("demo",), ("jobs", "list"), ("keys", "create")} <= set(verbs)
assert len(verbs) >= 25, verbs
for path in sorted(commands):
    if " ".join(path) in SERVER_COMMANDS:
        if path not in (("up",), ("worker",), ("api",), ("beat",)):
            continue
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        continue
    argv = list(path)
    for param in commands[path].params:
        if param.required:
            argv += ["1"] if param.param_type_name == "argument" else [param.opts[0], "1"]
    result = runner.invoke(app, argv)
    print(result.exit_code, " ".join(argv), "|", result.output.strip())
for argv in (["version"], ["migrate", "--help"], ["keys", "create", "--help"]):
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, (argv, result.output)
"""
    import os

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) >= 25
    for line in lines:
        status, _, rest = line.partition(" ")
        said = rest.partition(" | ")[2]
        assert (status, said) == ("2", "error: the client verbs need the latentbank-client "
                                       "package: pip install ./clients/python"), line


def test_keys_create_direct_goes_without_the_client_distribution(tmp_path):
    """`keys create --direct` (a deployment's first admin key, run in the API image)
    writes to the database: it never asks for the client."""
    import os

    code = """
import sys
import service.cli.main
from typer.testing import CliRunner
sys.modules["latentbank_client"] = None
result = CliRunner().invoke(service.cli.main.app, ["keys", "create", "--name", "a",
                                                   "--direct"])
print(result.exit_code, result.output.strip())
"""
    env = {k: v for k, v in os.environ.items() if k != "LATENTBANK_DATABASE_URL"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path,
                         env={**env, "PYTHONPATH": os.pathsep.join(sys.path),
                              "LATENTBANK_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"})
    assert out.returncode == 0, out.stderr
    assert "latentbank-client" not in out.stdout and "Traceback" not in out.stdout


def test_no_dependency_names_the_client_distribution():
    """latentbank-client is on no package index: a requirement or extra naming it would
    make pip resolve the name on the public index, where anyone may own it. The one route
    is `pip install ./clients/python`."""
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[3] / "pyproject.toml").read_text())
    project = project["project"]
    named = [d for d in [*project["dependencies"],
                         *(d for ds in project["optional-dependencies"].values() for d in ds)]
             if d.replace("_", "-").lower().startswith("latentbank")]
    assert named == []
