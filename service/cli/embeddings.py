"""`latentbank embeddings ...`, `search` and `export`: the /v1/embeddings resource."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from service.cli.output import (
    JsonOpt,
    RefArg,
    client,
    emit_json,
    fail,
    fmt,
    listing,
    out,
    show,
    table,
    verb,
)

embeddings_app = typer.Typer(help="Embedding sets (a model's latents of a dataset).",
                             no_args_is_help=True)
SET_COLUMNS = ["id", "model", "dataset", "status", "items", "dim", "vectors", "index",
               "mean ELBO", "mean log p(x)"]


def _set_rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    from latentbank_client._embeddings import build_note  # the client is optional

    for e in items:
        s = e.get("stats") or {}
        yield [e["id"], e["model_id"], e["dataset_id"], e["status"], e["n_items"], e["dim"],
               e.get("vector_type", "vector"),
               e["index_status"] + build_note(e["index_status"], e.get("index_build")),
               fmt(s.get("mean_elbo")), fmt(s.get("mean_log_px"))]


@embeddings_app.command("list")
@verb
def embeddings_list(model: Annotated[int | None, typer.Option(help="model id")] = None,
                    limit: int = typer.Option(100, min=1, max=1000),
                    as_json: JsonOpt = False) -> None:
    """Embedding sets, newest first."""
    with client() as c:
        items = c.embeddings.list(model_id=model, limit=limit)
    listing(items, as_json, "embedding sets", SET_COLUMNS, _set_rows)


@embeddings_app.command("show")
@verb
def embeddings_show(set_id: Annotated[str, RefArg("embedding set")],
                    as_json: JsonOpt = False) -> None:
    """One embedding set with its statistics."""
    with client() as c:
        show(c.embeddings.get(set_id).raw, f"embedding set {set_id}", as_json)


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


def _image(path: Path) -> Path:
    """--image: an existing file, checked here so that a typo is not an upload."""
    if not path.is_file():
        raise fail(f"--image {path}: no such file")
    return path


@verb
def search(set_id: Annotated[str, RefArg("embedding set")],
           key: Annotated[str | None, typer.Option(help="neighbours of this stored item")] = None,
           vector: Annotated[str | None, typer.Option(
               help="neighbours of this latent vector, comma-separated")] = None,
           image: Annotated[Path | None, typer.Option(
               help="neighbours of this picture (PNG, JPEG, WebP), decoded and encoded as "
                    "the set's items were", dir_okay=False)] = None,
           k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000)] = 10,
           metric: Annotated[str, typer.Option(help="l2 or cosine")] = "l2",
           label: Annotated[list[str] | None, typer.Option(
               help="keep only these labels (repeatable)")] = None,
           min_elbo: Annotated[float | None, typer.Option(help="keep ELBO >= this")] = None,
           filter_json: Annotated[str | None, typer.Option(
               "--filter", help='a filter as JSON, e.g. \'{"label": ["cat"]}\' (--label and '
                                '--min-elbo add to it)')] = None,
           exact: Annotated[bool, typer.Option(help="exact scan instead of HNSW")] = False,
           as_json: JsonOpt = False) -> None:
    """Nearest neighbours in latent space (of a stored item, a vector, or an image)."""
    if sum(v is not None for v in (key, vector, image)) != 1:
        raise fail("give exactly one of --key, --vector and --image")
    flt: dict[str, Any] = {}
    if filter_json is not None:
        try:
            flt = json.loads(filter_json)
        except ValueError:
            raise fail(f"--filter {filter_json!r} is not JSON") from None
        if not isinstance(flt, dict):
            raise fail("--filter must be a JSON object, e.g. '{\"label\": [\"cat\"]}'")
    if label:
        flt["label"] = label
    if min_elbo is not None:
        flt["elbo"] = [min_elbo, None]
    if image is not None:
        _image(image)
    with client() as c:
        es = c.embeddings.get(set_id)
        if image is not None:
            found = es.search(image=image, k=k, metric=metric, exact=exact,
                              filter=flt or None)
        elif key is not None:
            found = es.search(key=key, k=k, metric=metric, exact=exact, filter=flt or None)
        else:
            found = es.search(_floats(vector or ""), k=k, metric=metric, exact=exact,
                              filter=flt or None)
    answer = found.raw
    if as_json:
        emit_json(answer)
        return
    table(f"{len(answer['results'])} neighbours ({answer['plan']})",
          ["key", "label", "distance", "ELBO", "log p(x)"],
          ([h["key"], h["label"], fmt(h["distance"], 4), fmt(h["elbo"]), fmt(h["log_px"])]
           for h in answer["results"]))


@verb
def export(set_id: Annotated[str, RefArg("embedding set")],
           output: Annotated[Path, typer.Option(
               "-o", "--out", help="a .parquet or .ndjson file", dir_okay=False)],
           as_json: JsonOpt = False) -> None:
    """Download a whole embedding set (keys, labels, mu, logvar, ELBO terms, log p(x))."""
    suffix = output.suffix.lower()
    formats = {".parquet": "parquet", ".ndjson": "ndjson", ".jsonl": "ndjson"}
    if suffix not in formats:
        raise fail(f"--out {output}: write .parquet or .ndjson")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with client() as c:  # streamed to a file beside `output`, renamed once whole
        c.embeddings.get(set_id).export(output, formats[suffix])
    size = output.stat().st_size
    if as_json:
        emit_json({"path": str(output.resolve()), "bytes": size})
    else:
        out.print(f"wrote {output.resolve()} ({size / 1e6:.1f} MB in "
                  f"{time.perf_counter() - started:.1f} s)")


@embeddings_app.command("rm")
@verb
def embeddings_rm(set_id: Annotated[str, RefArg("embedding set")],
                  as_json: JsonOpt = False) -> None:
    """Delete an embedding set: its rows and index (refused while aliased or in use)."""
    with client() as c:
        c.embeddings.delete(set_id)
    emit_json({"deleted": set_id}) if as_json else out.print(f"deleted embedding set {set_id}")
