"""Embedding jobs take the same value checks as training and /score: a dataset whose stored
range the model's transform or likelihood cannot take (values > 1 for a binarising
Bernoulli, values past levels - 1 for a dequantising model) is a 422 naming it at
submission, for a new set and for an append; grey floats within a dequantising model's
range (integer-ness is no range's to say) fail the job in the worker before it writes a
row. Before, all of these were embedded, and a set of grey floats through a dequantising
model was labelled `discrete`."""

import io
import time

import numpy as np
import pytest

from tests.support import store_untrained_model, wait_job

SHAPE = [1, 4, 4]
MODELS = {
    "dequantized": {"input_shape": SHAPE, "latent_dim": 3, "hidden": [8],
                    "likelihood": "gaussian", "dequantize": "uniform", "levels": 17},
    "binarized": {"input_shape": SHAPE, "latent_dim": 3, "hidden": [8],
                  "likelihood": "bernoulli", "binarize": "dynamic"},
}


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def upload(client, name, array):
    answer = client.post("/v1/datasets", data={"name": name}, files={
        "file": (f"{name}.npy", npy(array), "application/octet-stream")})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["id"]


@pytest.fixture(scope="module")
def setup(client, api_db, api_settings, tmp_path_factory):
    rng = np.random.default_rng(11)
    models, grey = {}, {}
    for name, config in MODELS.items():
        model_id, _ = store_untrained_model(api_db, api_settings,
                                            str(tmp_path_factory.mktemp(name)), config)
        models[name] = model_id
        grey[name] = client.get(f"/v1/models/{model_id}").json()["dataset_id"]  # [0, 1)
    stamp = time.monotonic_ns()
    datasets = {
        "integers": upload(client, f"integers-{stamp}",
                           rng.integers(0, 17, (40, *SHAPE)).astype(np.uint8)),
        "past_levels": upload(client, f"past-levels-{stamp}",
                              rng.integers(0, 21, (40, *SHAPE)).astype(np.float32)),
        "grey": grey["dequantized"],
    }
    return models, datasets


def submit(client, model_id, dataset_id, **extra):
    return client.post("/v1/embedding-jobs", json={"model_id": model_id,
                                                   "dataset_id": dataset_id, **extra})


@pytest.mark.parametrize(("model", "dataset", "words"), [
    ("dequantized", "past_levels", ["integers 0 .. 16 (levels 17)", "[0, 20]"]),
    ("binarized", "integers", ["bernoulli likelihood (binarised) needs values in [0, 1]",
                               "[0, 16]"]),
    ("binarized", "past_levels", ["needs values in [0, 1]", "[0, 20]"]),
])
def test_a_range_the_model_cannot_take_is_refused_at_submission(client, setup, model,
                                                                 dataset, words):
    models, datasets = setup
    jobs_before = client.get("/v1/jobs", params={"kind": "embed", "limit": 1000}).json()
    answer = submit(client, models[model], datasets[dataset])
    assert answer.status_code == 422, answer.text
    message = answer.json()["error"]["message"]
    assert f"dataset {datasets[dataset]} cannot be embedded with model {models[model]}" in (
        message), message
    assert all(w in message for w in words), message
    # nothing was queued
    assert client.get("/v1/jobs", params={"kind": "embed", "limit": 1000}).json() == jobs_before


def test_integers_embed_and_an_append_out_of_range_is_refused(client, setup, api_worker):
    models, datasets = setup
    answer = submit(client, models["dequantized"], datasets["integers"])
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", (job["error"], job["progress_message"])
    set_id = job["embedding_set_id"]
    before = client.get(f"/v1/embeddings/{set_id}").json()
    assert before["stats"]["likelihood_kind"] == "discrete" and before["n_items"] == 40
    answer = submit(client, models["dequantized"], datasets["past_levels"],
                    embedding_set_id=set_id)
    assert answer.status_code == 422, answer.text
    assert "integers 0 .. 16" in answer.json()["error"]["message"]
    assert client.get(f"/v1/embeddings/{set_id}").json() == before


def test_grey_floats_through_a_dequantising_model_fail_before_any_row(client, setup,
                                                                       api_worker, api_db):
    from sqlalchemy import func, select

    from store.tables import Latent

    models, datasets = setup
    answer = submit(client, models["dequantized"], datasets["grey"])
    assert answer.status_code == 202, answer.text  # [0, 1) lies within 0 .. 16
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "failed", job
    assert job["attempts"] == 1, job  # a reason, not a crash retried
    assert f"dataset {datasets['grey']} cannot be embedded" in job["error"], job
    assert "integers 0 .. 16" in job["error"] and "item 0" in job["error"], job
    set_id = job["embedding_set_id"]
    assert client.get(f"/v1/embeddings/{set_id}").json()["status"] == "failed"
    with api_db.session() as s:
        assert s.scalar(select(func.count()).select_from(Latent)
                        .where(Latent.set_id == set_id)) == 0
