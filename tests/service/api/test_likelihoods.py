"""Likelihood options through the HTTP API and a real worker: uniform dequantisation of
integer data (bits/dim), the continuous Bernoulli (its decoder serves the mean, not
lambda), dynamic binarisation, and the Monte-Carlo errors stored per epoch and per item;
each figure checked against an independent computation (the formula by hand, torch's own
ContinuousBernoulli, the embedding job's torch figures for the same items)."""

import io
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.datasets import load_digits

from tests.support import wait_job

pytestmark = pytest.mark.slow

D = 64
TRAINING = {"epochs": 4, "batch_size": 64, "seed": 1, "importance_samples": 20,
            "eval_importance_samples": 4}


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def train(client, dataset_id, **model):
    answer = client.post("/v1/training-jobs", json={
        "dataset_id": dataset_id, "training": TRAINING,
        "model": {"family": "mlp", "latent_dim": 4, "hidden": [32], **model}})
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    return job, client.get(f"/v1/models/{job['model_id']}").json()


@pytest.fixture(scope="module")
def trained(client, api_worker):
    raw = load_digits().images.astype(np.float32)[:, None]  # integers 0..16
    answer = client.post("/v1/datasets", data={"name": "digits-integers"}, files={
        "file": ("digits.npy", npy(raw), "application/octet-stream")})
    assert answer.status_code in (200, 201), answer.text
    integers = answer.json()["id"]
    answer = client.post("/v1/datasets", json={"name": "digits-for-likelihoods",
                                               "builtin": "digits"})
    assert answer.status_code in (200, 201), answer.text
    grey = answer.json()["id"]
    models = {
        "dequantized": train(client, integers, likelihood="gaussian", dequantize="uniform",
                             levels=17),
        "continuous_bernoulli": train(client, grey, likelihood="continuous_bernoulli"),
        "binarized": train(client, grey, likelihood="bernoulli", binarize="dynamic"),
        "grey_bernoulli": train(client, grey, likelihood="bernoulli"),
    }
    return {"raw": raw, "integers": integers, "grey": grey, "models": models}


def test_summaries_say_which_figure_they_hold(trained):
    kinds = {name: model["summary"]["likelihood_kind"]
             for name, (_, model) in trained["models"].items()}
    assert kinds == {"dequantized": "discrete", "continuous_bernoulli": "density",
                     "binarized": "discrete", "grey_bernoulli": "unnormalised"}
    for name in ("dequantized", "binarized"):
        s = trained["models"][name][1]["summary"]
        # bits/dim by hand from the held-out log p(x) in nats
        assert s["heldout_bits_per_dim"] == pytest.approx(
            -s["heldout_log_px"] / (D * math.log(2)), rel=1e-9)
        assert list(s["heldout_log_px_by_k"]) == ["1", "10", "20"]
        assert s["heldout_log_px_se"] > 0
    dequantized = trained["models"]["dequantized"][1]["summary"]
    # a probability of 17-level data: at most 0 nats, at least that of a uniform guess
    # (-64 log 17) for a model that learned anything
    assert -D * math.log(17) < dequantized["heldout_log_px"] < 0
    grey_job, grey = trained["models"]["grey_bernoulli"]
    assert "NOT a normalised likelihood" in grey["summary"]["likelihood_note"]
    assert "not a normalised likelihood" in grey_job["progress_message"]


def test_metric_rows_carry_the_monte_carlo_error(client, trained):
    model_id = trained["models"]["binarized"][1]["id"]
    rows = client.get(f"/v1/models/{model_id}/metrics").json()
    val = [r for r in rows if r["split"] == "val"]
    assert len(val) == TRAINING["epochs"]
    assert all(r["log_px_se"] > 0 and 1 <= r["ess"] <= 4 for r in val)
    assert all(r["log_px_se"] is None for r in rows if r["split"] == "train")


def test_continuous_bernoulli_decoder_serves_its_mean(client, trained):
    model_id = trained["models"]["continuous_bernoulli"][1]["id"]
    z = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    got = np.asarray(client.post(f"/v1/models/{model_id}/decode",
                                 json={"z": z.tolist()}).json()["x"]).reshape(5, -1)
    decoder = ort.InferenceSession(
        client.get(f"/v1/models/{model_id}/onnx/decoder").content,
        providers=["CPUExecutionProvider"])
    names = [o.name for o in decoder.get_outputs()]
    assert names == ["mean", "probs", "logits"]  # logits last: older readers unchanged
    lam = decoder.run(["probs"], {"z": z})[0].reshape(5, -1).astype(np.float64)
    want = torch.distributions.ContinuousBernoulli(probs=torch.from_numpy(lam)).mean.numpy()
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - lam).max() > 0.01  # the mean is not lambda


def test_dequantized_scores_agree_with_the_embedding_job(client, trained):
    """Items 0..n-1 sent in order get the same dequantisation noise as the dataset's rows
    0..n-1 in the embedding job, so /score (NumPy over ONNX) and the job (torch) estimate
    the same log P(x) with independent posterior draws."""
    model_id = trained["models"]["dequantized"][1]["id"]
    answer = client.post("/v1/embedding-jobs", json={
        "model_id": model_id, "dataset_id": trained["integers"], "importance_samples": 100})
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    set_id = job["embedding_set_id"]
    es = client.get(f"/v1/embeddings/{set_id}").json()
    assert es["stats"]["likelihood_kind"] == "discrete"
    assert es["stats"]["mean_log_px_se"] > 0 and 1 <= es["stats"]["ess_min"] <= 100
    rows = []
    with client.stream("GET", f"/v1/embeddings/{set_id}/export") as response:
        rows = [json.loads(line) for line in response.iter_lines() if line]
    n = 200
    x = trained["raw"][:n]
    got = client.post(f"/v1/models/{model_id}/score", content=npy(x),
                      params={"importance_samples": 100, "seed": 5},
                      headers={"Content-Type": "application/octet-stream"}).json()
    assert got["likelihood_kind"] == "discrete"
    stored = rows[:n]
    np.testing.assert_allclose(got["kl"], [r["kl"] for r in stored], rtol=1e-4, atol=1e-4)
    d = np.asarray(got["log_px"]) - [r["log_px"] for r in stored]
    z = d / np.sqrt(np.asarray(got["log_px_se"]) ** 2
                    + np.asarray([r["log_px_se"] for r in stored]) ** 2)
    # Both sides are the same estimator (same K, same noise, same bias), so d is symmetric
    # about 0: the count of positive d is Binomial(n, 1/2) (sd 7.1; the bounds are 5.6 sd
    # out), which a constant wrong in either side (a missing log(levels) per dimension, a
    # shifted noise row) moves far outside. The delta method's standard error runs small
    # when a few weights dominate (CI saw 8 % of |z| > 3 at K = 30, the largest 5.7), so
    # the spread is checked loosely: other noise than the job's makes |z| >> 3 nearly
    # everywhere.
    positive = int(np.sum(d > 0))
    assert 60 <= positive <= 140, (positive, np.median(d))
    assert np.median(np.abs(z)) <= 1.5, np.sort(np.abs(z))[-10:]
    assert np.mean(np.abs(z) <= 3) >= 0.85, np.sort(np.abs(z))[-10:]
    np.testing.assert_allclose(got["bits_per_dim"],
                               -np.asarray(got["log_px"]) / (D * math.log(2)), rtol=1e-12)
    item = client.get(f"/v1/embeddings/{set_id}/items/{stored[0]['key']}").json()
    assert item["log_px_se"] == pytest.approx(stored[0]["log_px_se"])
    assert 1 <= item["ess"] <= 100


def test_items_a_transform_cannot_take_are_refused(client, trained):
    model_id = trained["models"]["dequantized"][1]["id"]
    before = client.get(f"/v1/models/{model_id}").json()
    x = trained["raw"][:3].copy()
    x[1, 0, 0, 0] = 0.5
    answer = client.post(f"/v1/models/{model_id}/score", content=npy(x),
                         headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 422, answer.text
    assert "integers 0 .. 16" in answer.json()["error"]["message"]
    assert "item 1" in answer.json()["error"]["message"]
    binarized = trained["models"]["binarized"][1]["id"]
    answer = client.post(f"/v1/models/{binarized}/encode",
                         json={"x": [[2.0] * D]})
    assert answer.status_code == 422 and "[0, 1]" in answer.json()["error"]["message"]
    assert client.get(f"/v1/models/{model_id}").json() == before
    # a training job on data that does not fit fails with the reason, and trains nothing
    answer = client.post("/v1/training-jobs", json={
        "dataset_id": trained["grey"], "training": TRAINING,
        "model": {"family": "mlp", "latent_dim": 4, "hidden": [8], "likelihood": "gaussian",
                  "dequantize": "uniform", "levels": 17}})
    assert answer.status_code in (202, 422), answer.text
    if answer.status_code == 202:
        job = wait_job(client, answer.json()["id"])
        assert job["status"] == "failed" and "integers 0 .. 16" in job["error"]
