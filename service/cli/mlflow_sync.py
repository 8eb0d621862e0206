"""`latentbank mlflow sync`: back-fill an MLflow server with models trained before the
bridge was configured (or catch one up by hand), straight from the database and the
artifact store, like `migrate` (docs/operations/mlflow.md)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

mlflow_app = typer.Typer(help="The MLflow bridge (LATENTBANK_MLFLOW_TRACKING_URI).",
                         no_args_is_help=True)


@mlflow_app.command("sync")
def mlflow_sync(
    model: Annotated[list[int] | None, typer.Option(
        "--model", help="a model id to push (repeatable); default: every model")] = None,
    tracking_uri: Annotated[str | None, typer.Option(
        help="the MLflow server (default: LATENTBANK_MLFLOW_TRACKING_URI)")] = None,
    passes: Annotated[int, typer.Option(min=1, help="at most this many passes")] = 1000,
) -> None:
    """Push models trained before the bridge was configured: each becomes a run with its
    parameters, every epoch's metrics, its summary and status, and a ready one a
    registered version with its ONNX files; aliases follow. Runs the passes the workers
    run, here, until nothing lags (exit 1 if the server stops answering)."""
    from store.db import Database, database_url
    from store.errors import StoreError
    from store.mlflow_sync import count_behind, track_models
    from store.settings import get_settings, open_artifacts

    settings = get_settings()
    uri = tracking_uri or settings.mlflow_tracking_uri
    if not uri:
        typer.echo("error: no MLflow server: set LATENTBANK_MLFLOW_TRACKING_URI or pass "
                   "--tracking-uri", err=True)
        raise typer.Exit(2)
    db = Database(database_url(settings))
    try:
        try:
            added = track_models(db, uri, model)
        except StoreError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        artifacts = open_artifacts(settings)
        total = count_behind(db, uri)
        typer.echo(f"{added} model(s) newly tracked on {uri}; {total} run(s) to bring up "
                   "to date", err=True)
        left, errors = _passes(db, artifacts, uri, settings, total, passes)
        for line in errors:
            typer.echo(f"refused: {line}", err=True)
        typer.echo(f"{uri}: {total - left} of {total} run(s) up to date"
                   + (f", {left} lagging (see `latentbank jobs show`)" if left else ""))
        if left:
            raise typer.Exit(1)
    finally:
        db.dispose()


def _passes(db: Any, artifacts: Any, uri: str, settings: Any, total: int,
            passes: int) -> tuple[int, list[str]]:
    """Bridge passes with a progress bar until nothing lags, or three passes in a row
    leave as many runs lagging (refused ones, jobs still training): (lagging, errors)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from bridges.mlflow_bridge import sync_pass
    from store.mlflow_sync import count_behind

    left, still, errors = total, 0, []
    with Progress(TextColumn("mlflow sync"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), transient=True) as bar:
        task = bar.add_task("", total=max(total, 1))
        for _ in range(passes):
            report = sync_pass(db, artifacts, uri, settings.mlflow_experiment,
                               timeout=settings.mlflow_timeout_seconds, budget=60.0)
            before, left = left, count_behind(db, uri)
            errors = report.errors
            bar.update(task, completed=max(0, total - left),
                       description=f"{report.versions} version(s) registered")
            if report.stopped:
                typer.echo(f"error: MLflow stopped answering: {report.stopped}", err=True)
                raise typer.Exit(1)
            still = still + 1 if left >= before and not report.skipped else 0
            if not left or still >= 3:
                break
            if report.skipped:  # a worker's pass holds the lock: it is catching up too
                time.sleep(1.0)
    return left, errors
