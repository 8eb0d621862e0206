"""The pure pipeline: train -> held-out evaluation -> verified ONNX, and its figures."""

import json
import os

import numpy as np
import onnxruntime as ort
import pytest

from models.checkpoint import load_model
from models.config import TrainConfig, VAEConfig
from models.data import load_digits_dataset
from models.pipeline import train_evaluate_export

pytestmark = pytest.mark.slow  # trains, evaluates and exports a model end to end


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
    assert summary["architecture"] == "mlp 64-64-4 relu, bernoulli"  # 8x8 in, 64, 4 latent
    # log p(x) estimate >= ELBO on average (same draws: logmeanexp >= mean).
    assert summary["heldout_log_px"] >= summary["heldout_elbo"]
    assert summary["heldout_elbo"] == pytest.approx(
        summary["heldout_reconstruction"] - summary["heldout_kl"])
    assert sum(summary["kl_per_dim"]) == pytest.approx(summary["heldout_kl"], rel=1e-6)


def test_heldout_thresholds_flag_their_share_of_the_heldout_items(run):
    """A threshold at rate f, read from the stored quantiles, has a share f of the held-out
    items' log p(x) below it (counted over the per-item figures)."""
    from service.api.scoring import threshold_at

    _, _, res = run
    quantiles = res.summary["heldout_quantiles"]
    assert quantiles["statistic"] == "log_px" and quantiles["importance_samples"] == 200
    assert quantiles["n_items"] == 180
    for fpr in (0.01, 0.05, 0.1, 0.25):
        below = float((res.heldout.log_px < threshold_at(quantiles, fpr)).mean())
        assert abs(below - fpr) <= 1 / 180, (fpr, below)


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
