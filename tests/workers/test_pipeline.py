"""The offline pipeline: train -> held-out evaluation -> verified ONNX, and its figures."""

import json
import os

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from models.checkpoint import load_model
from models.config import TrainConfig, VAEConfig
from models.data import load_digits_dataset
from store.plots import image_grid
from workers.pipeline import main, train_evaluate_export


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    images, _ = load_digits_dataset()
    out = str(tmp_path_factory.mktemp("pipeline"))
    cfg = VAEConfig(input_shape=(1, 8, 8), latent_dim=4, hidden=(64,))
    train = TrainConfig(epochs=3, batch_size=64, importance_samples=200, seed=1)
    return images, out, train_evaluate_export(images, cfg, train, out)


def test_outputs_and_summary(run):
    _, out, res = run
    assert {"checkpoint.safetensors", "encoder.onnx", "decoder.onnx",
            "summary.json"} <= set(os.listdir(out))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)["summary"]
    assert summary["heldout_n_items"] == len(res.train.val_rows) == 180
    assert summary["heldout_importance_samples"] == 200
    # log p(x) estimate >= ELBO on average (same draws: logmeanexp >= mean).
    assert summary["heldout_log_px"] >= summary["heldout_elbo"]
    assert summary["heldout_elbo"] == pytest.approx(
        summary["heldout_reconstruction"] - summary["heldout_kl"])
    assert sum(summary["kl_per_dim"]) == pytest.approx(summary["heldout_kl"], rel=1e-6)


def test_exported_encoder_matches_the_checkpoint(run):
    images, _, res = run
    import torch

    model = load_model(res.checkpoint_path)
    session = ort.InferenceSession(res.onnx["encoder"].path, providers=["CPUExecutionProvider"])
    mu, logvar = session.run(None, {"x": images[:10]})
    with torch.no_grad():
        want_mu, want_logvar = model.encode(torch.from_numpy(images[:10]))
    np.testing.assert_allclose(mu, want_mu.numpy(), atol=1e-4)
    np.testing.assert_allclose(logvar, want_logvar.numpy(), atol=1e-4)


def test_image_grid_layout():
    items = np.zeros((3, 1, 2, 2), np.float32)
    items[1] = 1.0
    grid = np.asarray(image_grid(items, columns=2, scale=1))
    # 2 columns x 2 rows of 2x2 tiles with 1-pixel borders: 5 x 7 pixels.
    assert grid.shape == (7, 7)
    assert grid[1:3, 4:6].min() == 255 and grid[1:3, 1:3].max() == 0


def test_offline_demo_command(tmp_path, capsys):
    main(["--out", str(tmp_path), "--epochs", "2", "--importance-samples", "10"])
    printed = capsys.readouterr().out
    assert "held-out log p(x) (K=10)" in printed
    for name in ("curves.png", "latent.png", "samples.png", "recon.png"):
        with Image.open(tmp_path / name) as image:
            assert image.width > 50
