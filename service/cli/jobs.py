"""`latentbank train`, `embed` and `jobs ...`: submissions and the /v1/jobs resource."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from service.cli.output import (
    JsonOpt,
    WatchOpt,
    check_ref,
    client,
    emit_json,
    err,
    listing,
    show,
    table,
    verb,
)

if TYPE_CHECKING:
    from latentbank_client import Client, Job

TERMINAL = ("succeeded", "failed", "cancelled")


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
# size: typer declares each of its 21 options in the signature (the body is 48)
def train(
    dataset: Annotated[int | None, typer.Option(help="dataset id")] = None,
    config: Annotated[Path | None, typer.Option(
        help="JSON or YAML: {model: {...}, training: {...}}; flags override it",
        exists=True, dir_okay=False)] = None,
    family: Annotated[str | None, typer.Option(help="mlp or conv")] = None,
    latent_dim: Annotated[int | None, typer.Option(help="latent dimensions")] = None,
    hidden: Annotated[str | None, typer.Option(help="hidden widths, e.g. 256,128")] = None,
    likelihood: Annotated[str | None, typer.Option(
        help="bernoulli, continuous_bernoulli, gaussian or discretized_logistic (8-bit "
             "images: log p(x) and bits/dim of the pixels)")] = None,
    blocks: Annotated[int | None, typer.Option(
        help="conv: residual blocks per resolution (0 = plain stride-2 convolutions)")
    ] = None,
    norm: Annotated[str | None, typer.Option(help="conv: none or group (GroupNorm)")] = None,
    activation: Annotated[str | None, typer.Option(
        help="relu, tanh (the IWAE paper's), gelu, elu, silu, softplus or leaky_relu")] = None,
    binarize: Annotated[str | None, typer.Option(
        help="bernoulli on grey data: static (one binary copy) or dynamic (re-drawn each "
             "epoch)")] = None,
    dequantize: Annotated[int | None, typer.Option(
        help="integer data 0..L-1: uniform dequantisation with L levels (e.g. 256); "
             "log p(x) and bits/dim of the discrete data")] = None,
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
             "model.likelihood": likelihood, "model.beta": beta,
             "model.blocks": blocks, "model.norm": norm, "model.activation": activation,
             "training.epochs": epochs,
             "model.binarize": binarize,
             "model.dequantize": "uniform" if dequantize is not None else None,
             "model.levels": dequantize,
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
    dataset_id = spec.pop("dataset_id")
    with client() as c:
        if grid:
            jobs = c.models.sweep(dataset_id, spec["model"], spec["training"], grid)
            answer: Any = {"sweep_id": jobs[0].sweep_id, "jobs": [j.raw for j in jobs]}
        else:
            jobs = [c.models.train(dataset_id, spec["model"], spec["training"])]
            answer = jobs[0].raw
        if as_json and not watch:
            emit_json(answer)
        elif not as_json:
            title = f"sweep {answer['sweep_id']}" if grid else "training job queued"
            table(title, JOB_COLUMNS, job_rows([j.raw for j in jobs]))
        if watch:
            status = max(watch_job(c, j, as_json) for j in jobs)
            raise typer.Exit(status)


jobs_app = typer.Typer(help="Follow, inspect and cancel jobs.", no_args_is_help=True)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"ETA {seconds // 60}:{seconds % 60:02d}"


def _final(job: dict[str, Any]) -> int:
    if job["status"] == "succeeded":
        made = {"train": f"model {job['model_id']}",
                "ingest": f"dataset {job.get('dataset_id')}"}.get(
            job["kind"], f"embedding set {job['embedding_set_id']}")
        err.print(f"job {job['id']} succeeded: {made}")
        return 0
    err.print(f"error: job {job['id']} {job['status']}: "
              f"{escape(job.get('error') or job.get('progress_message') or '')}")
    return 1


def watch_job(c: Client, job: Job | int, as_json: bool) -> int:
    """Follow a job (a latentbank_client Job, or its id) until it ends, from the API's
    event stream (the client's: it reconnects, and polls if the stream keeps failing);
    0 when it succeeded, 1 otherwise.

    A terminal gets a live bar (progress, the worker's message: epoch, val ELBO and
    log p(x) for training, and the ETA); a pipe gets one line per change; --json gets
    each state of the job as one JSON line.
    """
    from latentbank_client import JobFailed

    job_id = job if isinstance(job, int) else job.id
    with _shown(job_id, as_json) as seen:
        try:
            final = (c.jobs.wait(job_id, progress=seen) if isinstance(job, int)
                     else job.wait(progress=seen))
        except JobFailed as exc:
            final = exc.job
    if as_json:
        return 0 if final.status == "succeeded" else 1
    return _final(final.raw)


@contextlib.contextmanager
def _shown(job_id: int, as_json: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """What receives each state of a job while it is watched; a state equal to the one
    before (the job as submitted, then the stream's first event) is shown once."""
    last: list[dict[str, Any]] = []

    def changed(job: dict[str, Any]) -> bool:
        if last and last[0] == job:
            return False
        last[:] = [job]
        return True

    if as_json:
        yield lambda job: emit_json(job) if changed(job) else None
        return
    if not err.is_terminal:
        def line(job: dict[str, Any]) -> None:
            if changed(job):
                err.print(f"job {job_id} {job['status']} {100 * job['progress']:5.1f}% "
                          f"{escape(job.get('progress_message') or '')} "
                          f"{_eta(job.get('eta_seconds'))}".rstrip())
        yield line
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[message]}"), TextColumn("{task.fields[eta]}"),
                  console=err, transient=False) as bar:
        task = bar.add_task(f"job {job_id}", total=1.0, message="", eta="")

        def show_state(job: dict[str, Any]) -> None:
            bar.update(task, completed=job["progress"],
                       description=f"job {job_id} {job['kind']} {job['status']}",
                       message=escape(job.get("progress_message") or ""),
                       eta=_eta(job.get("eta_seconds")) if job["status"] not in TERMINAL
                       else "")
        yield show_state


@jobs_app.command("list")
@verb
def jobs_list(status: Annotated[str | None, typer.Option(help="queued, running, ...")] = None,
              kind: Annotated[str | None, typer.Option(help="train, embed or ingest")] = None,
              limit: int = typer.Option(50, min=1, max=1000), as_json: JsonOpt = False) -> None:
    """Jobs, newest first."""
    with client() as c:
        items = c.jobs.list(status=status, kind=kind, limit=limit)
    listing(items, as_json, "jobs", JOB_COLUMNS, job_rows)


@jobs_app.command("show")
@verb
def jobs_show(job_id: int, as_json: JsonOpt = False) -> None:
    """One job: status, progress, attempts, error, what it made."""
    with client() as c:
        show(c.jobs.get(job_id).raw, f"job {job_id}", as_json)


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
        j = c.jobs.cancel(job_id)
    emit_json(j.raw) if as_json else err.print(f"job {job_id}: cancel requested ({j.status})")


@verb
def embed(model: Annotated[str, typer.Option(help="a ready model's id, or @alias",
                                              callback=check_ref)],
          dataset: Annotated[int, typer.Option(help="dataset id")],
          importance_samples: Annotated[int | None, typer.Option(
              help="K > 0 also estimates each item's log p(x) (default 0; an append takes "
                   "the set's K)")] = None,
          into: Annotated[str | None, typer.Option(
              help="append the dataset's items to this ready set of the model (id or @alias)",
              callback=check_ref)] = None,
          vector_type: Annotated[str | None, typer.Option(
              help="'halfvec': store the codes as float16 (half the disk; reads answer "
                   "float32), 'vector': float32 (default: the server's setting; an append "
                   "takes the set's)")] = None,
          watch: WatchOpt = False, as_json: JsonOpt = False) -> None:
    """Queue an embedding job: every item's posterior and ELBO terms, into pgvector (a new
    set, or appended to one with --into)."""
    with client() as c:
        job = c.embeddings.create(model, dataset, importance_samples, append_to=into,
                                  vector_type=vector_type)
        if as_json and not watch:
            emit_json(job.raw)
        elif not as_json:
            table("embedding job queued", JOB_COLUMNS, job_rows([job.raw]))
        if watch:
            raise typer.Exit(watch_job(c, job, as_json))
