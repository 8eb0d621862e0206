"""The `latentbank` command line. Verbs arrive with the parts they drive (see README)."""

from __future__ import annotations

from importlib.metadata import version
from typing import Annotated

import typer

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
    from store.db import migrate, redacted, start_embedded_postgres
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
    except DatabaseUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        if server is not None:
            server.cleanup()


@app.command("worker")
def worker_command(
    queues: str = typer.Option("train,embed", help="comma-separated: train (GPU), embed"),
    concurrency: int = typer.Option(1, help="pool processes (GPU hosts: 1 per GPU)"),
    pool: str = typer.Option("auto", help="auto (solo when CUDA is present), prefork, solo"),
    name: str = typer.Option("latentbank@%h", help="the worker's node name"),
) -> None:
    """Run a Celery worker (a subprocess: this CLI never imports torch)."""
    import os
    import shutil
    import sys

    if pool == "auto":
        # CUDA cannot start in forked children: GPU workers use the solo pool.
        pool = "solo" if shutil.which("nvidia-smi") else "prefork"
    env = {**os.environ, "LATENTBANK_WORKER_CONCURRENCY": str(concurrency)}
    cmd = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", queues,
           "-P", pool, "-c", str(concurrency), "-n", name, "--loglevel", "INFO"]
    # exec, so signals (SIGTERM: warm shutdown) reach Celery itself
    os.execve(sys.executable, cmd, env)


@app.command("api")
def api_command(
    host: str = typer.Option(None, help="listen address (default: LATENTBANK_API_HOST)"),
    port: int = typer.Option(None, help="port (default: LATENTBANK_API_PORT)"),
    workers: int = typer.Option(1, help="uvicorn worker processes"),
) -> None:
    """Serve the HTTP API with uvicorn (needs LATENTBANK_DATABASE_URL; `up` sets it)."""
    import uvicorn

    from store.settings import get_settings

    settings = get_settings()
    if not settings.database_url:
        typer.echo("error: LATENTBANK_DATABASE_URL is not set", err=True)
        raise typer.Exit(2)
    uvicorn.run("service.app:create_app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port, workers=workers, log_level="info",
                proxy_headers=True)


keys_app = typer.Typer(help="API keys (written straight to the database).",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(
    name: str = typer.Option(..., help="who or what uses the key"),
    scope: Annotated[list[str] | None, typer.Option(
        help="read, write or admin (repeatable; default read)")] = None,
) -> None:
    """Create a key and print its secret once (stored hashed)."""
    from store.db import Database, start_embedded_postgres
    from store.errors import DatabaseUnavailable, InvalidInput
    from store.keys import create_key
    from store.settings import get_settings

    settings = get_settings()
    server = None
    try:
        if settings.database_url:
            url = settings.database_url
        else:
            server, url = start_embedded_postgres(settings.postgres_dir)
        db = Database(url)
        try:
            created = create_key(db, name, scope or ["read"])
        finally:
            db.dispose()
        typer.echo(created.key)
        typer.echo(f"key {created.id} ({created.prefix}..., scopes {','.join(created.scopes)})"
                   " created; the secret above is not shown again", err=True)
    except (InvalidInput, DatabaseUnavailable) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        if server is not None:
            server.cleanup()


def main() -> None:
    app()
