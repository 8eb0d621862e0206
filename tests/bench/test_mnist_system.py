"""One short run of bench/mnist.py through a real stack (`make test-system`): IDX files
made here from scikit-learn's digits, registered by ingest jobs, a VAE trained by a
training job and scored by embedding jobs, beside the plain loop."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from bench.mnist_data import FILES, write_idx

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]


def digits_as_mnist(folder: Path, n_train: int, n_test: int) -> np.ndarray:
    """28x28 uint8 images: each 8x8 digit scaled to 0..255, blown up 3x, padded by 2."""
    d = load_digits()
    images = np.pad(np.kron(d.images * (255 / 16), np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    images = np.round(images).astype(np.uint8)
    folder.mkdir(parents=True)
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, n_train + n_test))):
        write_idx(folder / FILES[split][0], images[rows])
        write_idx(folder / f"{FILES[split][1]}.gz", d.target[rows].astype(np.uint8))
    return d.target[:n_train + n_test]


def test_a_short_bench_run_through_the_service(tmp_path):
    labels = digits_as_mnist(tmp_path / "mnist", 600, 200)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LATENTBANK_")}
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "mnist.py"), "--datasets", "mnist",
         "--mnist-dir", str(tmp_path / "mnist"), "--epochs", "1", "--runs", "vae,plain",
         "--k-eval", "50", "--val-k", "20", "--no-overhead", "--seeds", "2",
         "--seed-items", "100", "--out", str(tmp_path / "out"),
         "--cache", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=800, env=env, cwd=ROOT,
        stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "mnist.json").read_text())["results"][0]
    service, service_1, plain, plain_1 = result["rows"]
    assert [(r["run"], r["seed"]) for r in result["rows"]] == [
        ("vae", 0), ("vae", 1), ("plain", 0), ("plain", 1)]
    # the extra seeds are scored on the first 100 test items only, both sides
    assert service_1["eval_items"] == plain_1["eval_items"] == result["seed_items"] == 100
    assert service_1["model_id"] != service["model_id"]
    # seed 0 scored all 200 items: the set's mean (SQL, over the stored rows) is the mean
    # of its exported per-item figures, and the seeds are compared on the first 100 alone
    items = {run: np.array(v) for run, v in result["item_log_px"].items()}
    assert sorted(items) == ["plain", "vae"] and len(items["vae"]) == len(items["plain"]) == 200
    assert service["test_log_px"] == pytest.approx(items["vae"].mean(), abs=1e-6)
    assert result["vae_seeds"] == pytest.approx([items["vae"][:100].mean(),
                                                 service_1["test_log_px"]], abs=1e-9)
    assert plain["test_log_px"] == pytest.approx(items["plain"].mean(), abs=1e-9)
    assert result["plain_seeds"] == pytest.approx([items["plain"][:100].mean(),
                                                   plain_1["test_log_px"]], abs=1e-9)
    # the verdict in the table: the difference of the seed means and its standard error
    a, b = np.array(result["vae_seeds"]), np.array(result["plain_seeds"])
    gap = a.mean() - b.mean()
    se = np.sqrt(a.var(ddof=1) / 2 + b.var(ddof=1) / 2)
    assert f"service minus plain loop, mean over seeds: {gap:+.3f} nats, standard error " \
           f"{se:.3f}" in (tmp_path / "out" / "mnist.md").read_text()
    assert service["eval_items"] == plain["eval_items"] == result["test_items"] == 200
    assert service["architecture"] == "mlp 784-200-200-50 tanh, bernoulli"
    # log p(x) of 784 binary pixels: below 0, and an IWAE-50 estimate above the ELBO
    assert -784 * np.log(2) * 2 < service["test_log_px"] < 0
    assert service["test_log_px"] > service["test_elbo"]
    assert 0 < service["mc_se"] < 5 and 0 < plain["mc_se"] < 5
    assert np.isfinite(plain["test_log_px"]) and plain["test_log_px"] < 0
    assert 0 <= service["knn_latents"] <= 1
    # kNN on pixels against a brute force here (k = 10, majority, ties to the nearest)
    d = load_digits()
    x = np.pad(np.kron(d.images * (255 / 16), np.ones((3, 3))), ((0, 0), (2, 2), (2, 2)))
    x = np.round(x).astype(np.uint8).reshape(len(x), -1) / 255.0
    hits = 0
    for i in range(600, 800):
        near = np.argsort(((x[:600] - x[i]) ** 2).sum(1), kind="stable")[:10]
        counts = np.bincount(labels[near], minlength=10)
        decided = next(v for v in labels[near] if counts[v] == counts.max())
        hits += decided == labels[i]
    assert result["knn_pixels"] == pytest.approx(hits / 200, abs=0.011)  # float32 ties
    table = (tmp_path / "out" / "mnist.md").read_text()
    assert "| mnist | service | ELBO (VAE, k = 1) |" in table and "-86.76" in table
