"""`latentbank datasets ...`: the /v1/datasets resource."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.output import (
    JsonOpt,
    client,
    emit_json,
    err,
    fail,
    fetch,
    show,
    table,
    verb,
)

datasets_app = typer.Typer(help="Register and list datasets.", no_args_is_help=True)


def _dataset_rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    for d in items:
        yield [d["id"], d["name"], d["n_items"], "×".join(map(str, d["item_shape"])),
               d["source_format"], "yes" if d["has_labels"] else "no",
               f"{d['min_value']:.3g}..{d['max_value']:.3g}", d["source_uri"] or ""]


def _split(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


DATASET_COLUMNS = ["id", "name", "items", "item shape", "format", "labels", "range", "source"]


def pack_folder(folder: Path, out: Path) -> Path:
    """The folder's regular files as an uncompressed .tar at `out`, written file by file
    (never the whole folder in memory): first a directory entry of the folder's own name,
    then each file under it (`photos/cat/001.png`), sorted by its path in the folder (the
    order the server reads a folder). The server drops a top folder that the archive
    opens with, so the keys are the paths in the folder (`cat/001.png`) and the dataset
    is the one a `--uri` of the same folder makes, whatever the folder's depth. Links
    are left out (the server does not follow them either)."""
    import tarfile

    names = []
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            if path.is_file() and not path.is_symlink():
                names.append(path.relative_to(folder).as_posix())
    top = folder.resolve().name or "folder"
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(folder, arcname=top, recursive=False)
        for name in sorted(names):
            tar.add(folder / name, arcname=f"{top}/{name}", recursive=False)
    return out


def follow(c: Any, answer: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """An ingest job followed to its end (a progress bar of items and bytes on a
    terminal); the dataset it registered, or exit 1 with the job's error."""
    from service.cli.jobs import watch_job

    job_id = answer["job"]["id"]
    if as_json:
        job = answer["job"]
        for state in c.events(job_id):
            job = state
        if job.get("status") != "succeeded":
            emit_json(job)
            raise typer.Exit(1)
    elif watch_job(c, job_id, False) != 0:
        raise typer.Exit(1)
    job = c.get(f"/v1/jobs/{job_id}")
    return c.get(f"/v1/datasets/{job['dataset_id']}")


@datasets_app.command("add")
@verb
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
    with client() as c, tempfile.TemporaryDirectory(prefix="latentbank-pack-") as tmp:
        if path is not None and path.is_dir():
            if labels or keys:
                raise fail("--labels and --keys go with a file, not a folder")
            name = name or path.resolve().name
            path = pack_folder(path, Path(tmp) / f"{path.resolve().name}.tar")
        answer = c.add_dataset(path=path, uri=uri, builtin=builtin, name=name, labels=labels,
                               keys=keys, **options)
        if answer.get("mode") == "job":
            if not wait:
                if as_json:
                    emit_json(answer)
                else:
                    job = answer["job"]
                    err.print(f"job {job['id']} queued: follow it with `latentbank jobs "
                              f"watch {job['id']}`")
                return
            d = follow(c, answer, as_json)
        else:
            d = answer
    if as_json:
        emit_json(d)
    else:
        table(f"dataset {d['id']}", DATASET_COLUMNS, _dataset_rows([d]))


@datasets_app.command("list")
@verb
def datasets_list(limit: int = typer.Option(100, min=1, max=1000),
                  as_json: JsonOpt = False) -> None:
    """Registered datasets, newest first."""
    items = fetch("/v1/datasets", limit=limit)
    if as_json:
        emit_json(items)
    else:
        table("datasets", DATASET_COLUMNS, _dataset_rows(items))


@datasets_app.command("show")
@verb
def datasets_show(dataset_id: int, as_json: JsonOpt = False) -> None:
    """One dataset."""
    show(f"/v1/datasets/{dataset_id}", f"dataset {dataset_id}", as_json)
