"""`make demo`'s program, on a fresh data folder: it starts the stack, goes through the API,
prints its summary and stops everything. Its figures are recomputed from the files it
leaves (the exported latents, the decoder)."""

import collections
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.support import alive, clean_env, free_port

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    seen = set()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "demo", "--epochs", "8",
         "--importance-samples", "200",
         "--queries", "120", "--out", str(out), "--port", str(free_port())],
        env=clean_env(root / "data"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True)
    # While it runs, note the stack's processes, to check that none outlives the demo.
    while proc.poll() is None:
        try:
            info = json.loads((root / "data" / "stack.json").read_text())
            seen |= {info["pid"], info["api_pid"], info["worker_pid"]}
        except (OSError, ValueError):
            pass
        time.sleep(0.2)
    output = proc.stdout.read()
    return {"root": root, "out": out, "rc": proc.returncode, "output": output, "pids": seen,
            "summary": json.loads((out / "summary.json").read_text()) if (
                out / "summary.json").exists() else None}


def test_the_demo_runs_to_its_summary_and_stops_the_stack(demo):
    assert demo["rc"] == 0, demo["output"]
    assert "latentbank demo: a VAE on scikit-learn's digits" in demo["output"]
    assert "stack stopped (exit status 0)" in demo["output"]
    for path in demo["summary"]["files"].values():
        assert Path(path).stat().st_size > 0 and path in demo["output"].replace("\n", "")
    assert len(demo["pids"]) == 3
    time.sleep(1)
    assert not [p for p in demo["pids"] if alive(p)]
    assert not (demo["root"] / "data" / "stack.json").exists()
    assert not (demo["root"] / "data" / "postgres" / "postmaster.pid").exists()


def test_the_admin_key_is_in_no_file_the_demo_leaves_but_its_own(demo):
    """`make demo` ran `latentbank up` with its output in out/demo/stack.log: the key is
    in the data folder's admin.key (0600), and in no log and no result."""
    import stat

    key_file = demo["root"] / "data" / "admin.key"
    key = key_file.read_text().strip()
    assert key.startswith("lb_") and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in demo["output"]
    holding = [str(f) for f in [*demo["out"].rglob("*"), *demo["root"].glob("data/logs/*")]
               if f.is_file() and key.encode() in f.read_bytes()]
    assert (demo["out"] / "stack.log").exists() and not holding


def test_knn_accuracy_equals_a_brute_force_over_the_exported_latents(demo):
    s = demo["summary"]
    rows = {r["key"]: r for r in pq.read_table(demo["out"] / "latents.parquet").to_pylist()}
    keys = list(rows)
    mu = np.asarray([rows[k]["mu"] for k in keys], dtype=np.float64)
    hits = 0
    for q in s["knn_queries"]:
        d = np.linalg.norm(mu - np.asarray(rows[q]["mu"]), axis=1)
        order = [keys[i] for i in np.argsort(d, kind="stable") if keys[i] != q][:s["knn_k"]]
        votes = collections.Counter(rows[k]["label"] for k in order)
        hits += votes.most_common(1)[0][0] == rows[q]["label"]
    assert s["knn_label_accuracy"] == pytest.approx(hits / len(s["knn_queries"]))
    assert len(s["knn_queries"]) == 120
    assert s["knn_label_accuracy"] > 3 * s["knn_majority_baseline"]  # it learned something


def test_set_statistics_and_held_out_bounds(demo):
    s = demo["summary"]
    rows = pq.read_table(demo["out"] / "latents.parquet").to_pylist()
    assert s["all_items_mean_elbo"] == pytest.approx(np.mean([r["elbo"] for r in rows]))
    assert s["all_items_mean_log_px"] == pytest.approx(np.mean([r["log_px"] for r in rows]))
    # ELBO = reconstruction - KL, and the importance-sampled log p(x) bounds it from above
    assert s["heldout_elbo"] == pytest.approx(s["heldout_reconstruction"] - s["heldout_kl"],
                                              abs=1e-6)
    assert s["heldout_elbo"] <= s["heldout_log_px"] < 0
    assert s["heldout_items"] == 180 and s["heldout_importance_samples"] == 200
    # binarised digits: a discrete likelihood, so bits/dim = -log p(x) / (64 ln 2)
    assert s["likelihood_kind"] == "discrete" and s["heldout_log_px_se"] > 0
    assert s["heldout_bits_per_dim"] == pytest.approx(-s["heldout_log_px"] / (64 * np.log(2)))
    assert list(s["heldout_log_px_by_k"]) == ["1", "10", "100", "200"]


def test_the_samples_grid_is_the_decoder_on_the_seeded_prior_draws(demo):
    s = demo["summary"]
    decoder = ort.InferenceSession(s["files"]["decoder.onnx"],
                                   providers=["CPUExecutionProvider"])
    z = np.random.default_rng(0).standard_normal((64, s["latent_dim"])).astype(np.float32)
    x = decoder.run(["probs"], {"z": z})[0][:, 0]  # 64 items of 8x8
    image = np.asarray(Image.open(s["files"]["prior samples (64, seed 0)"]).convert("L"),
                       dtype=np.float64)
    assert image.shape == ((4 * 9 + 1) * 4, (16 * 9 + 1) * 4)  # 4 rows of 16, borders, 4x
    # item (r, c) occupies pixels [4 + 36 r, 4 + 36 r + 32) x [4 + 36 c, ...), 4x upscaled
    for i in (0, 17, 63):
        r, c = divmod(i, 16)
        cell = image[4 + 36 * r: 36 + 36 * r: 4, 4 + 36 * c: 36 + 36 * c: 4]
        np.testing.assert_allclose(cell / 255.0, x[i], atol=1 / 255 + 1e-6)
