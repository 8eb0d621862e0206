"""`make demo`: the whole service on the builtin digits, through its HTTP API, on the stack
already running or on one it starts and stops (the steps: docs/quickstart.md)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.cli.jobs import watch_job
from service.cli.output import require_client
from service.cli.ports import free_port, port_free
from service.cli.running import UNVERIFIABLE, can_verify_stacks, read_stack, stack_file
from store.settings import get_settings

if TYPE_CHECKING:
    from latentbank_client import Client, Dataset, EmbeddingSet, Model

console = Console(highlight=False)
if not console.is_terminal:
    console.width = 120


@contextlib.contextmanager
def stack(data_dir: Path, port: int | None, log_path: Path) -> Iterator[tuple[str, float]]:
    """The URL of a running stack: the one already up in `data_dir`, else one started
    here (and stopped on the way out, whatever happens). Yields (url, seconds to start)."""
    running = read_stack(data_dir)
    if running:
        console.print(f"using the stack already running at {running['url']} "
                      f"(pid {running['pid']}); it stays up")
        yield running["url"], 0.0
        return
    if not can_verify_stacks():  # the stack started here could not be recognised
        raise SystemExit(f"error: {UNVERIFIABLE}; start `latentbank up`, then run "
                         "`latentbank demo --url URL`")
    settings = get_settings()
    if port is None:
        port = settings.api_port if port_free(settings.api_host, settings.api_port) else (
            free_port())
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    try:
        with console.status("starting the stack (PostgreSQL+pgvector, Redis, a worker, "
                            "the API)..."):
            while True:
                info = read_stack(data_dir)
                if info and info["pid"] == proc.pid:
                    break
                if proc.poll() is not None:
                    raise SystemExit(f"`latentbank up` exited with {proc.returncode}:\n"
                                     + log_path.read_text()[-3000:])
                if time.perf_counter() - started > 180:
                    raise SystemExit(f"the stack did not start in 180 s; see {log_path}")
                time.sleep(0.2)
        seconds = time.perf_counter() - started
        console.print(f"stack up at {info['url']} in {seconds:.1f} s (log {log_path})")
        yield info["url"], seconds
    finally:
        if proc.poll() is None:
            with console.status("stopping the stack..."):
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if stack_file(data_dir).exists() and not read_stack(data_dir):
            stack_file(data_dir).unlink(missing_ok=True)
        console.print(f"stack stopped (exit status {proc.returncode}); nothing left running")


def knn_accuracy(es: EmbeddingSet, keys: list[str], k: int) -> tuple[float, float, float]:
    """Leave-one-out kNN: each query item's label against the majority label of its k
    nearest *other* items (exact L2 search; a tie goes to the label met first, i.e. the
    nearer), all queries in one batch search. Returns (accuracy, the most common label's
    share among the queries: what guessing it would score, the batch's seconds)."""
    started = time.perf_counter()
    answers = es.search_many(keys=keys, k=k, exact=True)
    seconds = time.perf_counter() - started
    hits, own_labels = 0, collections.Counter()
    for answer in answers:  # a key's answer never holds the item itself
        own = answer.query["label"]
        votes = collections.Counter(h.label for h in answer)
        hits += votes.most_common(1)[0][0] == own
        own_labels[own] += 1
    return hits / len(keys), own_labels.most_common(1)[0][1] / len(keys), seconds


def run(c: Client, out: Path, epochs: int, latent_dim: int, importance_samples: int,
        queries: int, timings: dict[str, float]) -> dict[str, Any]:
    def timed(name: str, started: float) -> None:
        timings[name] = time.perf_counter() - started

    dataset, model, es = train_and_embed(c, epochs, latent_dim, importance_samples, timed)
    show_neighbours(es)
    rng = np.random.default_rng(0)
    query_keys = [str(i) for i in rng.choice(es.n_items, size=min(queries, es.n_items),
                                             replace=False)]
    started = time.perf_counter()
    accuracy, chance, batch_seconds = knn_accuracy(es, query_keys, k=10)
    timed(f"kNN accuracy ({len(query_keys)} searches)", started)
    files = write_files(model, es, out, timed)
    s, st = model.summary, es.stats
    summary = {
        "dataset_id": dataset.id, "model_id": model.id, "embedding_set_id": es.id,
        "heldout_items": s["heldout_n_items"], "heldout_elbo": s["heldout_elbo"],
        "heldout_reconstruction": s["heldout_reconstruction"], "heldout_kl": s["heldout_kl"],
        "heldout_log_px": s["heldout_log_px"], "heldout_log_px_se": s["heldout_log_px_se"],
        "heldout_log_px_by_k": s["heldout_log_px_by_k"],
        "heldout_bits_per_dim": s["heldout_bits_per_dim"],
        "likelihood_kind": s["likelihood_kind"],
        "collapse_warning": (s.get("collapse") or {}).get("warning"),
        "heldout_importance_samples": s["heldout_importance_samples"],
        "active_units": s["heldout_active_units"], "latent_dim": latent_dim,
        "epochs_run": s["epochs_run"], "best_epoch": s["best_epoch"],
        "all_items_mean_elbo": st["mean_elbo"], "all_items_mean_log_px": st["mean_log_px"],
        "knn_k": 10, "knn_queries": query_keys, "knn_label_accuracy": accuracy,
        "knn_majority_baseline": chance,
        "search_batch_ms": 1000 * batch_seconds,
        "timings_seconds": timings,
        "files": {name: str(path.resolve()) for name, path in files.items()},
    }
    files["summary"].write_text(json.dumps(summary, indent=2))
    return summary


def train_and_embed(c: Client, epochs: int, latent_dim: int, importance_samples: int,
                    timed: Callable[[str, float], None]) -> tuple[Dataset, Model, EmbeddingSet]:
    """The digits registered, a VAE trained on them and every item embedded, each step
    timed; (dataset, model, embedding set)."""
    started = time.perf_counter()
    dataset = c.datasets.add(builtin="digits", name="digits")
    timed("register digits", started)
    console.print(f"dataset {dataset.id}: {dataset.n_items} digits of "
                  f"{'×'.join(map(str, dataset.item_shape))} in [0, 1], with labels")

    started = time.perf_counter()
    job = c.models.train(
        dataset.id,
        # the IWAE paper's protocol: a Bernoulli on binary draws of the grey pixels, new
        # ones each epoch, so log p(x) is a normalised likelihood (in bits/dim too)
        {"family": "mlp", "latent_dim": latent_dim, "hidden": [128, 64],
         "likelihood": "bernoulli", "binarize": "dynamic"},
        {"epochs": epochs, "batch_size": 64, "lr": 2e-3, "seed": 0,
         "kl_warmup_epochs": min(10, epochs), "early_stopping_patience": 10,
         "importance_samples": importance_samples})
    console.print(f"training job {job.id} queued (model {job.model_id})")
    if watch_job(c, job, False):
        raise SystemExit("training failed")
    timed("train (queue to ready)", started)
    model = c.models.get(job.model_id)

    started = time.perf_counter()
    job = c.embeddings.create(model.id, dataset.id, importance_samples=100)
    console.print(f"embedding job {job.id} queued (embedding set {job.embedding_set_id})")
    if watch_job(c, job, False):
        raise SystemExit("embedding failed")
    timed("embed every item (K=100)", started)
    return dataset, model, c.embeddings.get(job.embedding_set_id)


def show_neighbours(es: EmbeddingSet) -> None:
    """Item 0's nearest neighbours in latent space, as a table."""
    item = es.item("0")
    near = es.search(key="0", k=6)
    console.print(f"nearest neighbours of item 0 (label {item.label}) in latent space:")
    t = Table()
    for col in ("key", "label", "L2 distance", "ELBO", "log p(x)"):
        t.add_column(col, justify="right")
    for h in near:
        t.add_row(h.key, h.label, f"{h.distance:.4f}", f"{h.elbo:.2f}", f"{h.log_px:.2f}")
    console.print(t)


def write_files(model: Model, es: EmbeddingSet, out: Path,
                timed: Callable[[str, float], None]) -> dict[str, Path]:
    """The demo's results into `out` (the summary's path named, written by the caller)."""
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    samples = model.sample_png(64, seed=0)
    timed("decode 64 prior samples to PNG", started)
    files = {"prior samples (64, seed 0)": out / "samples.png",
             "training curves": out / "curves.png",
             "latent scatter (PCA of mu)": out / "latent.png",
             "latents of every item": out / "latents.parquet",
             "encoder.onnx": out / "encoder.onnx", "decoder.onnx": out / "decoder.onnx",
             "summary": out / "summary.json"}
    files["prior samples (64, seed 0)"].write_bytes(samples.data)
    files["training curves"].write_bytes(model.curves_png().data)
    files["latent scatter (PCA of mu)"].write_bytes(es.latents_png().data)
    es.export(files["latents of every item"], "parquet")
    for role in ("encoder", "decoder"):
        files[f"{role}.onnx"].write_bytes(model.onnx(role))
    return files


def report(summary: dict[str, Any]) -> None:
    t = Table(title="latentbank demo: a VAE on scikit-learn's digits, through the HTTP API",
              caption="ELBO and log p(x) in nats per item: higher is better",
              title_justify="left", caption_justify="left")
    t.add_column("measure")
    t.add_column("value", justify="right")
    k = summary["heldout_importance_samples"]
    for name, value in [
        ("held-out items (the validation split)", summary["heldout_items"]),
        ("test ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z))", f"{summary['heldout_elbo']:.3f}"),
        ("  reconstruction E_q[log p(x|z)]", f"{summary['heldout_reconstruction']:.3f}"),
        ("  KL(q(z|x) || p(z))", f"{summary['heldout_kl']:.3f}"),
        (f"test log p(x) (importance sampling, K={k}; >= ELBO) ± its Monte-Carlo error",
         f"{summary['heldout_log_px']:.3f} ± {summary['heldout_log_px_se']:.3f}"),
        *((f"  the same with the first K={kk} draws", f"{value:.3f}")
          for kk, value in summary["heldout_log_px_by_k"].items() if int(kk) < k),
        (f"  in bits per dimension ({summary['likelihood_kind']}: binarised digits)",
         f"{summary['heldout_bits_per_dim']:.4f}"),
        ("active latent units", f"{summary['active_units']} / {summary['latent_dim']}"),
        ("epochs run (best)", f"{summary['epochs_run']} ({summary['best_epoch']})"),
        (f"kNN label accuracy in latent space (k={summary['knn_k']}, leave-one-out, "
         f"{len(summary['knn_queries'])} items)", f"{summary['knn_label_accuracy']:.3f}"),
        ("  guessing the most common label", f"{summary['knn_majority_baseline']:.3f}"),
        (f"batch search ({len(summary['knn_queries'])} exact queries, one request)",
         f"{summary['search_batch_ms']:.0f} ms"),
        *((f"time: {name}", f"{seconds:.1f} s")
          for name, seconds in summary["timings_seconds"].items()),
    ]:
        t.add_row(escape(name), str(value))
    console.print(t)
    if summary.get("collapse_warning"):
        console.print(f"warning: {summary['collapse_warning']}")
    console.print("results:")
    for name, path in summary["files"].items():
        console.print(f"  {name:28s} {path}")


DEMO_OUT = Path("out/demo")


def demo(
    epochs: int = typer.Option(100, help="at most; training stops early once validation "
                                         "stalls"),
    latent_dim: int = typer.Option(8, help="latent dimensions"),
    importance_samples: int = typer.Option(1000, help="K of the held-out log p(x) estimate"),
    queries: int = typer.Option(300, help="items whose neighbours measure the kNN label "
                                          "accuracy"),
    port: int = typer.Option(None, help="API port of the stack started here (default 8000, "
                                        "else a free one)"),
    url: str = typer.Option(None, help="use the API running there instead of a stack here "
                                       "(its key from LATENTBANK_API_KEY), e.g. a compose "
                                       "deployment"),
    out: Annotated[Path, typer.Option(help="folder for the results and plots")] = DEMO_OUT,
) -> None:
    """The whole service on the built-in digits, through its HTTP API (what `make demo`
    runs): train, embed, search, decode; prints a summary and where the results are."""
    lb = require_client()  # before anything else: exit 2 saying what to install

    data_dir = get_settings().data_dir
    timings: dict[str, float] = {}
    began = time.perf_counter()
    try:
        if url:
            with lb.Client(url) as c:
                summary = run(c, out, epochs, latent_dim, importance_samples, queries, timings)
        else:
            with stack(data_dir, port, out / "stack.log") as (local, seconds):
                if seconds:
                    timings["start the stack"] = seconds
                with lb.Client(local) as c:
                    summary = run(c, out, epochs, latent_dim, importance_samples, queries,
                                  timings)
    except lb.LatentbankError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    summary["timings_seconds"]["total"] = time.perf_counter() - began
    Path(summary["files"]["summary"]).write_text(json.dumps(summary, indent=2))
    report(summary)
