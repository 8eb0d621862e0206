"""/score with fpr: the threshold's estimator and split. A log p(x) threshold taken with K
importance samples holds only for K (the estimate's bias shrinks with K), an ELBO threshold
only for one draw; a model trained with val_fraction = 0 took its "held-out" figures from
its training rows, and the answer says so. Models here are untrained (no training job),
with the held-out summary a training job would store written by hand."""

import io

import numpy as np
import pytest

from tests.support import store_untrained_model

MODEL = {"input_shape": [1, 4, 4], "latent_dim": 3, "hidden": [8]}
HELDOUT_K = 7


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def with_summary(db, model_id, summary):
    from store.tables import Model

    with db.session() as s:
        s.get(Model, model_id).summary = summary


def quantiles(statistic, k):
    from models.evaluate import QUANTILE_LEVELS

    # held-out values spread evenly over [-200, -100]: the threshold at rate f is -200 + 200 f
    return {"statistic": statistic, "importance_samples": k, "n_items": 1001,
            "levels": QUANTILE_LEVELS.tolist(),
            "values": (-200.0 + 200.0 * QUANTILE_LEVELS).tolist()}


@pytest.fixture(scope="module")
def models(api_db, api_settings, tmp_path_factory):
    """`train_split`: log p(x) thresholds at K = 7 from the training rows (val_fraction = 0);
    `val_split`: ELBO thresholds (K = 0) from the validation split."""
    out = {}
    for name, split, statistic, k in (("train_split", "train", "log_px", HELDOUT_K),
                                      ("val_split", "val", "elbo", 0)):
        folder = tmp_path_factory.mktemp(name)
        model_id, _ = store_untrained_model(api_db, api_settings, str(folder), MODEL)
        with_summary(api_db, model_id, {"heldout_split": split,
                                        "heldout_quantiles": quantiles(statistic, k)})
        out[name] = model_id
    return out


def score(client, model_id, **params):
    x = np.random.default_rng(0).random((3, 1, 4, 4), dtype=np.float32)
    return client.post(f"/v1/models/{model_id}/score", params=params, content=npy(x),
                       headers={"Content-Type": "application/x-npy"})


@pytest.mark.parametrize("k", [0, 1, 6, 8, 100])
def test_another_k_than_the_thresholds_is_refused_naming_it(client, models, k):
    answer = score(client, models["train_split"], fpr=0.05, importance_samples=k)
    assert answer.status_code == 422, answer.text
    message = answer.json()["error"]["message"]
    assert f"importance_samples = {HELDOUT_K}" in message and f"with {k}" in message, message


def test_the_thresholds_k_is_taken_and_the_training_split_is_named(client, models):
    for params in ({"fpr": 0.05}, {"fpr": 0.05, "importance_samples": HELDOUT_K}):
        answer = score(client, models["train_split"], **params)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["importance_samples"] == HELDOUT_K
        t = got["threshold"]
        assert t["value"] == pytest.approx(-190.0)
        assert t["split"] == "training" and "val_fraction = 0" in t["note"]
        assert got["is_outlier"] == [v < -190.0 for v in got["log_px"]]
    # without fpr any K is fine: there is no threshold to compare with
    assert score(client, models["train_split"], importance_samples=3).status_code == 200
    summary = client.get(f"/v1/models/{models['train_split']}").json()["summary"]
    assert summary["heldout_thresholds"]["split"] == "training"
    assert summary["heldout_thresholds"]["importance_samples"] == HELDOUT_K


def test_an_elbo_threshold_takes_one_draw_and_names_the_validation_split(client, models):
    for k in (None, 0, 1):
        params = {"fpr": 0.1} | ({} if k is None else {"importance_samples": k})
        answer = score(client, models["val_split"], **params)
        assert answer.status_code == 200, answer.text
        t = answer.json()["threshold"]
        assert t["statistic"] == "elbo" and t["split"] == "validation" and t["note"] is None
    answer = score(client, models["val_split"], fpr=0.1, importance_samples=5)
    assert answer.status_code == 422, answer.text
    assert "one posterior draw" in answer.json()["error"]["message"]
    summary = client.get(f"/v1/models/{models['val_split']}").json()["summary"]
    assert summary["heldout_thresholds"]["split"] == "validation"


def test_the_answer_says_where_the_logits_came_from(client, models):
    got = score(client, models["val_split"]).json()
    assert got["logits_source"] == "exported"  # a file exported with its logits
