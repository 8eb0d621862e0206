"""`latentbank datasets ...`: the /v1/datasets resource."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from service.cli.output import (
    JsonOpt,
    client,
    emit_json,
    err,
    fail,
    listing,
    show,
    table,
    verb,
)

if TYPE_CHECKING:
    from latentbank_client import Client, Job

datasets_app = typer.Typer(help="Register and list datasets.", no_args_is_help=True)


def _dataset_rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    for d in items:
        yield [d["id"], d["name"], d["n_items"], "×".join(map(str, d["item_shape"])),
               d["source_format"], "yes" if d["has_labels"] else "no",
               f"{d['min_value']:.3g}..{d['max_value']:.3g}", d["source_uri"] or ""]


def _split(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


DATASET_COLUMNS = ["id", "name", "items", "item shape", "format", "labels", "range", "source"]


def follow(c: Client, job: Job, as_json: bool) -> dict[str, Any]:
    """An ingest job followed to its end (a progress bar of items and bytes on a
    terminal); the dataset it registered (the API's JSON), or exit 1 with the job's
    error (--json: the job's last state)."""
    from latentbank_client import JobFailed

    from service.cli.jobs import watch_job

    if as_json:
        try:
            job.wait()
        except JobFailed as exc:
            emit_json(exc.job.raw)
            raise typer.Exit(1) from None
    elif watch_job(c, job, False) != 0:
        raise typer.Exit(1)
    return c.jobs.get(job.id).dataset().raw


@datasets_app.command("add")
@verb
# size: typer declares each of its options in the signature
def datasets_add(
    path: Annotated[Path | None, typer.Argument(
        help="a local file (.npy/.npz/.parquet/.csv, an archive of images .zip/.tar/"
             ".tar.gz, an image parquet, IDX) or a folder of images (packed into a .tar "
             "on the fly and uploaded)", exists=True, show_default=False)] = None,
    uri: Annotated[str | None, typer.Option(
        help="a file or folder on the server (under LATENTBANK_ALLOWED_ROOTS) or an object "
             "under LATENTBANK_ALLOWED_URLS: an ingest job")] = None,
    builtin: Annotated[str | None, typer.Option(help="a builtin dataset: digits")] = None,
    name: Annotated[str | None, typer.Option(help="default: the file name")] = None,
    labels: Annotated[Path | None, typer.Option(
        help="an .npy of labels, one per item (uploads only)", exists=True)] = None,
    keys: Annotated[Path | None, typer.Option(
        help="an .npy of item keys (uploads only)", exists=True)] = None,
    array: Annotated[str | None, typer.Option(help=".npz member holding the data")] = None,
    key_column: Annotated[str | None, typer.Option(help="table column of item keys")] = None,
    label_column: Annotated[str | None, typer.Option(help="table column of labels")] = None,
    feature_columns: Annotated[str | None, typer.Option(
        help="comma-separated table columns to use as features")] = None,
    metadata_columns: Annotated[str | None, typer.Option(
        help="comma-separated table columns kept as metadata")] = None,
    image_size: Annotated[str | None, typer.Option(
        help="images: resize + centre crop to N or HxW (default: each image's own)")] = None,
    color: Annotated[str | None, typer.Option(help="images: grey or rgb (default)")] = None,
    data_format: Annotated[str | None, typer.Option(
        "--format", help="default: told by the extension or contents")] = None,
    image_column: Annotated[str | None, typer.Option(
        help="parquet: the column of images")] = None,
    max_failure_share: Annotated[float | None, typer.Option(
        help="refuse the source when more than this share of items cannot be read",
        min=0.0, max=1.0)] = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="follow an ingest job to its end (--no-wait: print the "
                                 "job at once)")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Register a dataset: upload PATH (a file, an archive or a folder), name a
    server-side --uri, or a --builtin. Archives, folders, large files and every --uri
    run as an ingest job on the workers, followed with a progress bar."""
    if sum(x is not None for x in (path, uri, builtin)) != 1:
        raise fail("give exactly one of PATH, --uri and --builtin")
    if (labels or keys) and path is None:
        raise fail("--labels and --keys go with an uploaded PATH")
    options = {"array": array, "key_column": key_column, "label_column": label_column,
               "feature_columns": _split(feature_columns),
               "metadata_columns": _split(metadata_columns), "image_size": image_size,
               "color": color, "format": data_format, "image_column": image_column,
               "max_failure_share": max_failure_share}
    if path is not None and path.is_dir() and (labels or keys):
        raise fail("--labels and --keys go with a file, not a folder")
    with client() as c:
        from latentbank_client import Dataset

        # a folder is packed into a .tar by the client; an archive, a folder, a large
        # file and every --uri answer with an ingest job
        answer = c.datasets.add(path, uri=uri, builtin=builtin, name=name, labels=labels,
                                keys=keys, wait=False, **options)
        if isinstance(answer, Dataset):  # registered inside the request
            d = answer.raw
        elif not wait:
            if as_json:  # the 202 answer (IngestAccepted): the dataset comes with the job
                emit_json({"mode": "job", "job": answer.raw, "dataset": None})
            else:
                err.print(f"job {answer.id} queued: follow it with `latentbank jobs "
                          f"watch {answer.id}`")
            return
        else:
            d = follow(c, answer, as_json)
    if as_json:
        emit_json(d)
    else:
        table(f"dataset {d['id']}", DATASET_COLUMNS, _dataset_rows([d]))


@datasets_app.command("list")
@verb
def datasets_list(limit: int = typer.Option(100, min=1, max=1000),
                  as_json: JsonOpt = False) -> None:
    """Registered datasets, newest first."""
    with client() as c:
        items = c.datasets.list(limit=limit)
    listing(items, as_json, "datasets", DATASET_COLUMNS, _dataset_rows)


@datasets_app.command("show")
@verb
def datasets_show(dataset_id: int, as_json: JsonOpt = False) -> None:
    """One dataset."""
    with client() as c:
        show(c.datasets.get(dataset_id).raw, f"dataset {dataset_id}", as_json)
