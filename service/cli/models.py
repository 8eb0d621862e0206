"""`latentbank models ...` and `decode`: the /v1/models resource."""

from __future__ import annotations

import json
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
    table,
    verb,
)

models_app = typer.Typer(help="Trained models.", no_args_is_help=True)


def _model_rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    for m in items:
        cfg, s = m["config"].get("model", {}), m.get("summary") or {}
        yield [m["id"], m["dataset_id"], m["status"], cfg.get("family"), cfg.get("latent_dim"),
               cfg.get("likelihood"), fmt(s.get("heldout_elbo")), fmt(s.get("heldout_log_px")),
               s.get("epochs_run")]


MODEL_COLUMNS = ["id", "dataset", "status", "family", "latent", "likelihood",
                 "held-out ELBO", "held-out log p(x)", "epochs"]


@models_app.command("list")
@verb
def models_list(status: Annotated[str | None, typer.Option()] = None,
                dataset: Annotated[int | None, typer.Option(help="dataset id")] = None,
                limit: int = typer.Option(100, min=1, max=1000),
                as_json: JsonOpt = False) -> None:
    """Models, newest first, with held-out ELBO and log p(x) (nats per item)."""
    with client() as c:
        items = c.models.list(status=status, dataset_id=dataset, limit=limit)
    listing(items, as_json, "models", MODEL_COLUMNS, _model_rows)


@models_app.command("show")
@verb
def models_show(model_id: Annotated[str, RefArg("model")], as_json: JsonOpt = False) -> None:
    """One model: its configuration, held-out summary and per-epoch metrics."""
    with client() as c:
        model = c.models.get(model_id)
        m, metrics = model.raw, [row.raw for row in model.metrics()]
    if as_json:
        emit_json({**m, "metrics": metrics})
        return
    table(f"model {model_id} ({m['status']})", ["", "value"], [
        ("dataset", m["dataset_id"]), ("model", json.dumps(m["config"].get("model"))),
        ("training", json.dumps(m["config"].get("training"))),
        *(((k, fmt(v) if not isinstance(v, list) else json.dumps(v))
           for k, v in (m.get("summary") or {}).items() if not isinstance(v, dict)))])
    summary = m.get("summary") or {}
    by_k = summary.get("heldout_log_px_by_k")
    if by_k:
        table(f"held-out log p(x) as K grows ({summary.get('likelihood_kind')}; nats, the "
              f"last ± {fmt(summary.get('heldout_log_px_se'))})", ["K", "log p(x)"],
              ([k, fmt(v)] for k, v in by_k.items()))
    for line in (summary.get("likelihood_note"), (summary.get("collapse") or {}).get("warning")):
        if line:
            out.print(f"note: {line}")
    val = [r for r in metrics if r["split"] == "val"] or metrics
    table("per-epoch metrics (nats per item)", ["epoch", "split", "ELBO", "reconstruction",
                                                "KL", "log p(x)", "± se", "active"],
          ([r["epoch"], r["split"], fmt(r["elbo"]), fmt(r["reconstruction"]), fmt(r["kl"]),
            fmt(r["log_px"]), fmt(r.get("log_px_se")), r["active_units"]] for r in val))


@models_app.command("onnx")
@verb
def models_onnx(model_id: Annotated[str, RefArg("model")],
                out_dir: Annotated[Path, typer.Option("--out", help="folder to write to")] = Path(
                    "."),
                as_json: JsonOpt = False) -> None:
    """Download the model's verified encoder.onnx and decoder.onnx."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    with client() as c:
        model = c.models.get(model_id)
        for role in ("encoder", "decoder"):
            path = out_dir / f"model-{model_id}-{role}.onnx"
            path.write_bytes(model.onnx(role))
            written[role] = str(path.resolve())
    if as_json:
        emit_json(written)
        return
    for role, path in written.items():
        out.print(f"{role}: {path}")


def _write(output: Path, data: bytes, as_json: bool) -> None:
    """An answer's bytes to `output`; say where (JSON: path and size)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    if as_json:
        emit_json({"path": str(output.resolve()), "bytes": len(data)})
    else:
        out.print(f"wrote {output.resolve()}")


@verb
def decode(model_id: Annotated[str, RefArg("a ready model's")],
           output: Annotated[Path, typer.Option(
               "-o", "--out", help="where to write: .npy (the decoder's mean) or .png (a grid)",
               dir_okay=False)],
           z: Annotated[Path | None, typer.Option(
               help="an .npy of latent vectors, shape (n, latent_dim)", exists=True)] = None,
           sample: Annotated[int | None, typer.Option(
               help="decode N draws from the prior instead", min=1)] = None,
           seed: Annotated[int | None, typer.Option(help="seed of the prior draws")] = None,
           temperature: Annotated[float, typer.Option(help="prior scale")] = 1.0,
           as_json: JsonOpt = False) -> None:
    """Decode latent vectors (--z) or prior samples (--sample N) to .npy or a PNG grid."""
    import numpy as np

    suffix = output.suffix.lower()
    if suffix not in (".npy", ".png"):
        raise fail(f"--out {output}: write .npy or .png")
    if (z is None) == (sample is None):
        raise fail("give exactly one of --z FILE.npy and --sample N")
    with client() as c:
        model = c.models.get(model_id)
        if z is not None:
            vectors = np.load(z, allow_pickle=False)
            png = suffix == ".png"
            answer = model.decode_png(vectors) if png else model.decode(vectors)
        else:
            answer = (model.sample_png(sample, seed, temperature) if suffix == ".png"
                      else model.sample(sample, seed, temperature))
    _write(output, answer.data if suffix == ".png" else _npy(answer), as_json)


def _npy(array: Any) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@models_app.command("score")
@verb
def models_score(model_id: Annotated[str, RefArg("a ready model's")],
                 items: Annotated[Path, typer.Argument(
                     help="an .npy of items, shape (n, *item_shape) or (n, item_size)",
                     exists=True, dir_okay=False)],
                 importance_samples: Annotated[int | None, typer.Option(
                     "-k", "--importance-samples", min=0, max=5000,
                     help="K draws for log p(x) (default 0; with --fpr the held-out K)")] = None,
                 fpr: Annotated[float | None, typer.Option(
                     help="flag items below the held-out threshold at this false-positive "
                          "rate")] = None,
                 seed: Annotated[int | None, typer.Option(help="seed of the draws")] = None,
                 as_json: JsonOpt = False) -> None:
    """Score new items: ELBO, KL and log p(x) ± its Monte-Carlo error, and outliers."""
    import numpy as np

    x = np.load(items, allow_pickle=False)
    with client() as c:
        got = c.models.get(model_id).score(x, fpr=fpr, importance_samples=importance_samples,
                                           seed=seed).raw
    if as_json:
        emit_json(got)
        return
    n = got["n_items"]

    def col(name: str, i: int) -> Any:
        return None if got.get(name) is None else got[name][i]

    table(f"model {model_id}: {n} items scored (K = {got['importance_samples']}, nats, "
          f"{got['likelihood_kind']})",
          ["item", "ELBO", "KL", "log p(x)", "± se", "ESS", "bits/dim", "outlier"],
          ([i, fmt(col("elbo", i)), fmt(col("kl", i)), fmt(col("log_px", i)),
            fmt(col("log_px_se", i)), fmt(col("ess", i), 1), fmt(col("bits_per_dim", i)),
            "" if got.get("is_outlier") is None else "yes" * got["is_outlier"][i]]
           for i in range(n)))
    if got.get("threshold"):
        t = got["threshold"]
        out.print(f"threshold {t['statistic']} < {t['value']:.3f} (fpr {t['fpr']} on "
                  f"{t['heldout_items']} held-out items): {sum(got['is_outlier'])} of {n} "
                  "flagged")


@models_app.command("traverse")
@verb
def models_traverse(model_id: Annotated[str, RefArg("a ready model's")],
                    output: Annotated[Path, typer.Option(
                        "-o", "--out", help=".png (rows = dimensions, columns = steps) or "
                                            ".json (the arrays)", dir_okay=False)],
                    embedding: Annotated[int | None, typer.Option(
                        help="with --key: start from that item's mu (default: the prior "
                             "mean)")] = None,
                    key: Annotated[str | None, typer.Option(help="the base item's key")] = None,
                    top: Annotated[int, typer.Option(
                        min=1, max=256, help="the dimensions with most held-out KL")] = 8,
                    steps: Annotated[int, typer.Option(min=2, max=64)] = 9,
                    span: Annotated[float, typer.Option(
                        help="each dimension moves by -span..+span")] = 3.0,
                    as_json: JsonOpt = False) -> None:
    """Latent traversals: one dimension at a time from a base point, as a PNG grid."""
    suffix = output.suffix.lower()
    if suffix not in (".png", ".json"):
        raise fail(f"--out {output}: write .png or .json")
    if (embedding is None) != (key is None):
        raise fail("--embedding and --key go together (the base item's set and key)")
    with client() as c:
        model = c.models.get(model_id)
        if suffix == ".png":
            data = model.traverse_png(embedding_set=embedding, key=key, top=top,
                                      steps=steps, span=span).data
        else:
            data = json.dumps(model.traverse(embedding_set=embedding, key=key, top=top,
                                             steps=steps, span=span).raw).encode()
    _write(output, data, as_json)


@models_app.command("rm")
@verb
def models_rm(model_id: Annotated[str, RefArg("model")], as_json: JsonOpt = False) -> None:
    """Delete a model with its embedding sets and files (refused while aliased or in use)."""
    with client() as c:
        c.models.delete(model_id)
    emit_json({"deleted": model_id}) if as_json else out.print(f"deleted model {model_id}")
