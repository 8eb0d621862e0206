"""The client verbs of the `latentbank` command: each one is a call to the HTTP API.

Human output is a rich table on stdout (progress on stderr); `--json` prints the API's
JSON instead, for scripts. A failure prints one line, `error: <reason>`, on stderr and
exits 1 (the API refused or the job failed), 2 (bad usage or input) or 3 (no API).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.client import NPY, TERMINAL, Client, ClientError, npy_body, reason

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)
for _console in (out, err):
    if not _console.is_terminal:  # a pipe or a file: wide lines rather than wrapped cells
        _console.width = 200

JsonOpt = Annotated[bool, typer.Option("--json", help="print the API's JSON (for scripts)")]
WatchOpt = Annotated[bool, typer.Option("--watch", help="follow the job until it ends")]
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"error: {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def verb(fn: F) -> F:
    """Turn ClientError and bad local input into one line on stderr and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except (OSError, ValueError) as exc:
            raise fail(str(exc), 2) from None

    return wrapper  # type: ignore[return-value]


def client() -> Client:
    return Client()


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: list[str], rows: Iterable[Iterable[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for row in rows:
        t.add_row(*(escape("" if v is None else str(v)) for v in row))
    out.print(t)


def fields(title: str, data: dict[str, Any]) -> None:
    table(title, ["field", "value"], ((k, json.dumps(v) if isinstance(v, dict | list) else v)
                                      for k, v in data.items()))


def fetch(path: str, **params: Any) -> Any:
    """GET `path` with the query parameters that are set."""
    with client() as c:
        return c.get(path, params={k: v for k, v in params.items() if v is not None})


def show(path: str, title: str, as_json: bool) -> None:
    """One resource: its JSON, or a field/value table."""
    data = fetch(path)
    if as_json:
        emit_json(data)
    else:
        fields(title, data)


def fmt(value: Any, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(
        value)


# --- datasets --------------------------------------------------------------------------
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


# --- training --------------------------------------------------------------------------
def _yaml_loader() -> Any:
    """YAML's safe loader, also reading 1e-3 as a number (YAML 1.1 wants a dot: 1.0e-3)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                 list("-+0123456789."))
    return Loader


def _scalar(text: str) -> Any:
    """'8' -> 8, '1e-3' -> 0.001, 'true' -> True, '[256,128]' -> [256, 128], 'mlp' -> 'mlp'."""
    import yaml

    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader
    except yaml.YAMLError:
        return text


def _assign(config: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, name = dotted.partition(".")
    if section not in ("model", "training") or not name:
        raise ValueError(f"{dotted!r}: settings are named model.<field> or training.<field>")
    config.setdefault(section, {})[name] = value


def _load_config(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.load(path.read_text(), Loader=_yaml_loader())  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not JSON or YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not set(data) <= {"dataset_id", "model", "training",
                                                       "grid"}:
        raise ValueError(f"{path}: expected a mapping with 'model', 'training' and optionally "
                         "'dataset_id' and 'grid'")
    return data


def job_rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    for j in items:
        yield [j["id"], j["kind"], j["status"], f"{100 * j['progress']:.0f}%",
               j.get("progress_message") or j.get("error") or "", j.get("model_id"),
               j.get("embedding_set_id"), str(j["created_at"])[:19]]


JOB_COLUMNS = ["id", "kind", "status", "progress", "message", "model", "set", "created"]


@verb
def train(
    dataset: Annotated[int | None, typer.Option(help="dataset id")] = None,
    config: Annotated[Path | None, typer.Option(
        help="JSON or YAML: {model: {...}, training: {...}}; flags override it",
        exists=True, dir_okay=False)] = None,
    family: Annotated[str | None, typer.Option(help="mlp or conv")] = None,
    latent_dim: Annotated[int | None, typer.Option(help="latent dimensions")] = None,
    hidden: Annotated[str | None, typer.Option(help="hidden widths, e.g. 256,128")] = None,
    likelihood: Annotated[str | None, typer.Option(
        help="bernoulli or gaussian")] = None,
    beta: Annotated[float | None, typer.Option(help="KL weight")] = None,
    epochs: Annotated[int | None, typer.Option()] = None,
    batch_size: Annotated[int | None, typer.Option()] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    importance_samples: Annotated[int | None, typer.Option(
        help="K of the held-out log p(x) estimate")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="any setting, e.g. --set model.free_bits=0.1 (repeatable)")] = None,
    sweep: Annotated[list[str] | None, typer.Option(
        help="a grid axis, e.g. --sweep model.latent_dim=2,8 (repeatable): one job per "
             "combination")] = None,
    watch: WatchOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Queue a training job (or a --sweep of them) on a dataset."""
    spec: dict[str, Any] = _load_config(config) if config else {}
    spec.setdefault("model", {})
    spec.setdefault("training", {})
    flags = {"model.family": family, "model.latent_dim": latent_dim,
             "model.hidden": [int(h) for h in hidden.split(",")] if hidden else None,
             "model.likelihood": likelihood, "model.beta": beta, "training.epochs": epochs,
             "training.batch_size": batch_size, "training.lr": lr, "training.seed": seed,
             "training.importance_samples": importance_samples}
    for dotted, value in flags.items():
        if value is not None:
            _assign(spec, dotted, value)
    for item in set_ or []:
        dotted, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected model.<field>=<value>")
        _assign(spec, dotted.strip(), _scalar(value))
    grid = dict(spec.pop("grid", None) or {})
    for item in sweep or []:
        dotted, eq, values = item.partition("=")
        if not eq or not values:
            raise ValueError(f"--sweep {item!r}: expected model.<field>=v1,v2,...")
        grid[dotted.strip()] = [_scalar(v) for v in values.split(",")]
    if dataset is not None:
        spec["dataset_id"] = dataset
    if "dataset_id" not in spec:
        raise ValueError("which dataset? give --dataset ID (see `latentbank datasets list`)")
    with client() as c:
        if grid:
            answer = c.post("/v1/sweeps", json={**spec, "grid": grid})
            jobs = answer["jobs"]
        else:
            jobs = [c.post("/v1/training-jobs", json=spec)]
            answer = jobs[0]
        if as_json and not watch:
            emit_json(answer)
        elif not as_json:
            title = f"sweep {answer['sweep_id']}" if grid else "training job queued"
            table(title, JOB_COLUMNS, job_rows(jobs))
        if watch:
            status = max(watch_job(c, j["id"], as_json) for j in jobs)
            raise typer.Exit(status)


# --- jobs ------------------------------------------------------------------------------
jobs_app = typer.Typer(help="Follow, inspect and cancel jobs.", no_args_is_help=True)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"ETA {seconds // 60}:{seconds % 60:02d}"


def _final(job: dict[str, Any]) -> int:
    if job["status"] == "succeeded":
        made = (f"model {job['model_id']}" if job["kind"] == "train"
                else f"embedding set {job['embedding_set_id']}")
        err.print(f"job {job['id']} succeeded: {made}")
        return 0
    err.print(f"error: job {job['id']} {job['status']}: "
              f"{escape(job.get('error') or job.get('progress_message') or '')}")
    return 1


def watch_job(c: Client, job_id: int, as_json: bool) -> int:
    """Follow a job until it ends; 0 when it succeeded, 1 otherwise.

    A terminal gets a live bar (progress, the worker's message: epoch, val ELBO and
    log p(x) for training, and the ETA); a pipe gets one line per change; --json gets
    each state of the job as one JSON line.
    """
    job: dict[str, Any] = {}
    if as_json:
        for job in c.events(job_id):
            emit_json(job)
        return 0 if job.get("status") == "succeeded" else 1
    if not err.is_terminal:
        for job in c.events(job_id):
            err.print(f"job {job_id} {job['status']} {100 * job['progress']:5.1f}% "
                      f"{escape(job.get('progress_message') or '')} {_eta(job['eta_seconds'])}"
                      .rstrip())
        return _final(job)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[message]}"), TextColumn("{task.fields[eta]}"),
                  console=err, transient=False) as bar:
        task = bar.add_task(f"job {job_id}", total=1.0, message="", eta="")
        for job in c.events(job_id):
            bar.update(task, completed=job["progress"],
                       description=f"job {job_id} {job['kind']} {job['status']}",
                       message=escape(job.get("progress_message") or ""),
                       eta=_eta(job["eta_seconds"]) if job["status"] not in TERMINAL else "")
    return _final(job)


@jobs_app.command("list")
@verb
def jobs_list(status: Annotated[str | None, typer.Option(help="queued, running, ...")] = None,
              kind: Annotated[str | None, typer.Option(help="train or embed")] = None,
              limit: int = typer.Option(50, min=1, max=1000), as_json: JsonOpt = False) -> None:
    """Jobs, newest first."""
    items = fetch("/v1/jobs", status=status, kind=kind, limit=limit)
    emit_json(items) if as_json else table("jobs", JOB_COLUMNS, job_rows(items))


@jobs_app.command("show")
@verb
def jobs_show(job_id: int, as_json: JsonOpt = False) -> None:
    """One job: status, progress, attempts, error, what it made."""
    show(f"/v1/jobs/{job_id}", f"job {job_id}", as_json)


@jobs_app.command("watch")
@verb
def jobs_watch(job_id: int, as_json: JsonOpt = False) -> None:
    """Follow a job live until it ends; exits 0 only if it succeeded."""
    with client() as c:
        raise typer.Exit(watch_job(c, job_id, as_json))


@jobs_app.command("cancel")
@verb
def jobs_cancel(job_id: int, as_json: JsonOpt = False) -> None:
    """Cancel: a queued job never starts, a running one stops at its next check."""
    with client() as c:
        j = c.post(f"/v1/jobs/{job_id}/cancel")
    emit_json(j) if as_json else err.print(f"job {job_id}: cancel requested ({j['status']})")


# --- models and embedding sets ---------------------------------------------------------
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
    items = fetch("/v1/models", status=status, dataset_id=dataset, limit=limit)
    emit_json(items) if as_json else table("models", MODEL_COLUMNS, _model_rows(items))


@models_app.command("show")
@verb
def models_show(model_id: int, as_json: JsonOpt = False) -> None:
    """One model: its configuration, held-out summary and per-epoch metrics."""
    with client() as c:
        m = c.get(f"/v1/models/{model_id}")
        metrics = c.get(f"/v1/models/{model_id}/metrics")
    if as_json:
        emit_json({**m, "metrics": metrics})
        return
    table(f"model {model_id} ({m['status']})", ["", "value"], [
        ("dataset", m["dataset_id"]), ("model", json.dumps(m["config"].get("model"))),
        ("training", json.dumps(m["config"].get("training"))),
        *(((k, fmt(v) if not isinstance(v, list) else json.dumps(v))
           for k, v in (m.get("summary") or {}).items() if not isinstance(v, dict)))])
    val = [r for r in metrics if r["split"] == "val"] or metrics
    table("per-epoch metrics (nats per item)", ["epoch", "split", "ELBO", "reconstruction",
                                                "KL", "log p(x)", "active"],
          ([r["epoch"], r["split"], fmt(r["elbo"]), fmt(r["reconstruction"]), fmt(r["kl"]),
            fmt(r["log_px"]), r["active_units"]] for r in val))


@models_app.command("onnx")
@verb
def models_onnx(model_id: int,
                out_dir: Annotated[Path, typer.Option("--out", help="folder to write to")] = Path(
                    "."),
                as_json: JsonOpt = False) -> None:
    """Download the model's verified encoder.onnx and decoder.onnx."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    with client() as c:
        for role in ("encoder", "decoder"):
            path = out_dir / f"model-{model_id}-{role}.onnx"
            path.write_bytes(c.request("GET", f"/v1/models/{model_id}/onnx/{role}").content)
            written[role] = str(path.resolve())
    if as_json:
        emit_json(written)
        return
    for role, path in written.items():
        out.print(f"{role}: {path}")


embeddings_app = typer.Typer(help="Embedding sets (a model's latents of a dataset).",
                             no_args_is_help=True)
SET_COLUMNS = ["id", "model", "dataset", "status", "items", "dim", "index", "mean ELBO",
               "mean log p(x)"]


def _set_rows(items: list[dict[str, Any]]) -> Iterator[list[Any]]:
    for e in items:
        s = e.get("stats") or {}
        yield [e["id"], e["model_id"], e["dataset_id"], e["status"], e["n_items"], e["dim"],
               e["index_status"], fmt(s.get("mean_elbo")), fmt(s.get("mean_log_px"))]


@embeddings_app.command("list")
@verb
def embeddings_list(model: Annotated[int | None, typer.Option(help="model id")] = None,
                    limit: int = typer.Option(100, min=1, max=1000),
                    as_json: JsonOpt = False) -> None:
    """Embedding sets, newest first."""
    items = fetch("/v1/embeddings", model_id=model, limit=limit)
    emit_json(items) if as_json else table("embedding sets", SET_COLUMNS, _set_rows(items))


@embeddings_app.command("show")
@verb
def embeddings_show(set_id: int, as_json: JsonOpt = False) -> None:
    """One embedding set with its statistics."""
    show(f"/v1/embeddings/{set_id}", f"embedding set {set_id}", as_json)


@verb
def embed(model: Annotated[int, typer.Option(help="a ready model's id")],
          dataset: Annotated[int, typer.Option(help="dataset id")],
          importance_samples: Annotated[int, typer.Option(
              help="K > 0 also estimates each item's log p(x)")] = 0,
          watch: WatchOpt = False, as_json: JsonOpt = False) -> None:
    """Queue an embedding job: every item's posterior and ELBO terms, into pgvector."""
    with client() as c:
        job = c.post("/v1/embedding-jobs", json={"model_id": model, "dataset_id": dataset,
                                                 "importance_samples": importance_samples})
        if as_json and not watch:
            emit_json(job)
        elif not as_json:
            table("embedding job queued", JOB_COLUMNS, job_rows([job]))
        if watch:
            raise typer.Exit(watch_job(c, job["id"], as_json))


# --- retrieval and serving -------------------------------------------------------------
def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of numbers") from None


@verb
def search(set_id: Annotated[int, typer.Argument(help="embedding set id")],
           key: Annotated[str | None, typer.Option(help="neighbours of this stored item")] = None,
           vector: Annotated[str | None, typer.Option(
               help="neighbours of this latent vector, comma-separated")] = None,
           k: Annotated[int, typer.Option("-k", "--k", min=1, max=1000)] = 10,
           metric: Annotated[str, typer.Option(help="l2 or cosine")] = "l2",
           label: Annotated[list[str] | None, typer.Option(
               help="keep only these labels (repeatable)")] = None,
           min_elbo: Annotated[float | None, typer.Option(help="keep ELBO >= this")] = None,
           exact: Annotated[bool, typer.Option(help="exact scan instead of HNSW")] = False,
           as_json: JsonOpt = False) -> None:
    """Nearest neighbours in latent space (of a stored item, or of a vector)."""
    if (key is None) == (vector is None):
        raise fail("give exactly one of --key and --vector")
    body: dict[str, Any] = {"k": k, "metric": metric, "exact": exact}
    if key is not None:
        body["key"] = key
    else:
        body["vector"] = _floats(vector or "")
    flt: dict[str, Any] = {}
    if label:
        flt["label"] = label
    if min_elbo is not None:
        flt["elbo"] = [min_elbo, None]
    if flt:
        body["filter"] = flt
    with client() as c:
        answer = c.post(f"/v1/embeddings/{set_id}/search", json=body)
    if as_json:
        emit_json(answer)
        return
    table(f"{len(answer['results'])} neighbours ({answer['plan']})",
          ["key", "label", "distance", "ELBO", "log p(x)"],
          ([h["key"], h["label"], fmt(h["distance"], 4), fmt(h["elbo"]), fmt(h["log_px"])]
           for h in answer["results"]))


@verb
def decode(model_id: Annotated[int, typer.Argument(help="a ready model's id")],
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
    accept = NPY if suffix == ".npy" else "image/png"
    with client() as c:
        if z is not None:
            vectors = np.load(z, allow_pickle=False)
            data = c.post_array(f"/v1/models/{model_id}/decode", accept,
                                content=npy_body(vectors), headers={"Content-Type": NPY})
        else:
            data = c.post_array(f"/v1/models/{model_id}/sample", accept, json={
                "n": sample, "seed": seed, "temperature": temperature})
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(data)
    if as_json:
        emit_json({"path": str(output.resolve()), "bytes": len(data)})
    else:
        out.print(f"wrote {output.resolve()}")


@verb
def export(set_id: Annotated[int, typer.Argument(help="embedding set id")],
           output: Annotated[Path, typer.Option(
               "-o", "--out", help="a .parquet or .ndjson file", dir_okay=False)],
           as_json: JsonOpt = False) -> None:
    """Download a whole embedding set (keys, labels, mu, logvar, ELBO terms, log p(x))."""
    suffix = output.suffix.lower()
    formats = {".parquet": "parquet", ".ndjson": "ndjson", ".jsonl": "ndjson"}
    if suffix not in formats:
        raise fail(f"--out {output}: write .parquet or .ndjson")
    output.parent.mkdir(parents=True, exist_ok=True)
    started, size = time.perf_counter(), 0
    tmp = output.with_name(output.name + ".part")
    with client() as c, c.http.stream("GET", f"/v1/embeddings/{set_id}/export",
                                      params={"format": formats[suffix]},
                                      timeout=None) as response:
        if response.status_code >= 400:
            response.read()
            raise ClientError(reason(response))
        with open(tmp, "wb") as f:
            for chunk in response.iter_bytes():
                f.write(chunk)
                size += len(chunk)
    tmp.replace(output)  # never a half-written file under the asked name
    if as_json:
        emit_json({"path": str(output.resolve()), "bytes": size})
    else:
        out.print(f"wrote {output.resolve()} ({size / 1e6:.1f} MB in "
                  f"{time.perf_counter() - started:.1f} s)")


# --- keys ------------------------------------------------------------------------------
keys_app = typer.Typer(help="API keys (admin scope).", no_args_is_help=True)


@keys_app.command("create")
@verb
def keys_create(
    name: Annotated[str, typer.Option(help="who or what uses the key")],
    scope: Annotated[list[str] | None, typer.Option(
        help="read, write or admin (repeatable; default read)")] = None,
    direct: Annotated[bool, typer.Option(
        help="write to the database in LATENTBANK_DATABASE_URL instead of calling the API "
             "(to make a deployment's first admin key)")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a key and print its secret once (the server stores only its hash)."""
    scopes = scope or ["read"]
    if direct:
        created = _create_key_direct(name, scopes)
    else:
        with client() as c:
            created = c.post("/v1/keys", json={"name": name, "scopes": scopes})
    if as_json:
        emit_json(created)
        return
    sys.stdout.write(created["key"] + "\n")
    err.print(f"key {created['id']} ({created['prefix']}..., scopes "
              f"{','.join(created['scopes'])}) created; the secret above is not shown again")


def _create_key_direct(name: str, scopes: list[str]) -> dict[str, Any]:
    from store.db import Database, database_url
    from store.errors import StoreError
    from store.keys import create_key
    from store.settings import get_settings

    try:
        db = Database(database_url(get_settings()))
        try:
            k = create_key(db, name, scopes)
        finally:
            db.dispose()
    except StoreError as exc:
        raise fail(str(exc)) from None
    return {"id": k.id, "name": k.name, "key": k.key, "prefix": k.prefix, "scopes": k.scopes}


@keys_app.command("list")
@verb
def keys_list(as_json: JsonOpt = False) -> None:
    """Every key (never the secrets)."""
    items = fetch("/v1/keys")
    if as_json:
        emit_json(items)
    else:
        table("API keys", ["id", "name", "prefix", "scopes", "last used", "revoked"],
              ([k["id"], k["name"], k["prefix"], ",".join(k["scopes"]),
                str(k["last_used_at"] or "")[:19], str(k["revoked_at"] or "")[:19]]
               for k in items))


@keys_app.command("revoke")
@verb
def keys_revoke(key_id: int, as_json: JsonOpt = False) -> None:
    """Revoke a key (other API processes notice within 10 s)."""
    with client() as c:
        k = c.request("DELETE", f"/v1/keys/{key_id}").json()
    emit_json(k) if as_json else err.print(f"key {key_id} revoked")


def register(app: typer.Typer) -> None:
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(models_app, name="models")
    app.add_typer(embeddings_app, name="embeddings")
    app.add_typer(keys_app, name="keys")
    for fn in (train, embed, search, decode, export):
        app.command(fn.__name__)(fn)
