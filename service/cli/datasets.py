"""`latentbank datasets ...`: the /v1/datasets resource."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.output import (
    JsonOpt,
    client,
    emit_json,
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


@datasets_app.command("add")
@verb
def datasets_add(
    path: Annotated[Path | None, typer.Argument(
        help="a local .npy/.npz/.parquet/.csv file to upload", exists=True, dir_okay=False,
        show_default=False)] = None,
    uri: Annotated[str | None, typer.Option(
        help="a file already on the server, under LATENTBANK_ALLOWED_ROOTS")] = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Register a dataset: upload PATH, or name a server-side --uri, or a --builtin."""
    if sum(x is not None for x in (path, uri, builtin)) != 1:
        raise fail("give exactly one of PATH, --uri and --builtin")
    if (labels or keys) and path is None:
        raise fail("--labels and --keys go with an uploaded PATH")
    with client() as c:
        d = c.add_dataset(path=path, uri=uri, builtin=builtin, name=name, labels=labels,
                          keys=keys, array=array, key_column=key_column,
                          label_column=label_column,
                          feature_columns=_split(feature_columns),
                          metadata_columns=_split(metadata_columns))
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
