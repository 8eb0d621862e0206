"""The `latentbank` command line. Verbs arrive with the parts they drive (see README)."""

from __future__ import annotations

from importlib.metadata import version

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


def main() -> None:
    app()
