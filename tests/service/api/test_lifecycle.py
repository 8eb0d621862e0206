"""Aliases and deletion over HTTP: `@name` wherever an id goes, atomic moves with history,
409s naming what holds an object, and a deleted model gone from the API's caches."""

import time

import httpx
import numpy as np
import pytest

from tests.store.sets import ready_set, write_latents
from tests.support import store_untrained_model

MODEL = {"input_shape": [1, 4, 4], "latent_dim": 3, "hidden": [8]}


@pytest.fixture
def models(api_db, api_settings, tmp_path):
    ids = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        ids.append(store_untrained_model(api_db, api_settings, str(tmp_path / name), MODEL)[0])
    return ids


def a_set(db, model_id, n=64):  # the items of store_untrained_model's dataset
    with db.session() as s:
        from store.tables import Model

        dataset_id = s.get(Model, model_id).dataset_id
    mu = np.random.default_rng(1).normal(size=(n, 3)).astype(np.float32)
    return ready_set(db, model_id, dataset_id, lambda set_id: write_latents(
        db, set_id, 0, mu, mu, np.zeros(n), np.zeros(n), np.zeros(n)))


def decode(client, ref):
    return client.post(f"/v1/models/{ref}/decode", json={"z": [[0.1, 0.2, 0.3]]})


def test_an_alias_addresses_its_model_wherever_an_id_goes(client, models, api_db):
    a, b = models
    answer = client.put("/v1/aliases/prod", json={"model_id": a})
    assert answer.status_code == 201, answer.text
    assert answer.json()["target_id"] == a and answer.json()["kind"] == "model"
    assert client.get("/v1/models/@prod").json()["id"] == a
    assert decode(client, "@prod").json() == decode(client, a).json()
    moved = client.put("/v1/aliases/prod", json={"model_id": b})
    assert moved.status_code == 200 and moved.json()["target_id"] == b
    assert client.get("/v1/models/@prod").json()["id"] == b
    assert decode(client, "@prod").json() == decode(client, b).json()
    history = client.get("/v1/aliases/prod").json()["history"]
    assert [(h["action"], h["target_id"], h["previous_id"]) for h in history] == [
        ("created", a, None), ("moved", b, a)]
    assert history[0]["key_id"] is not None  # who made the change
    set_id = a_set(api_db, b)
    assert client.put("/v1/aliases/prod-latents", json={"embedding_set_id": set_id}
                      ).status_code == 201
    assert client.get("/v1/embeddings/@prod-latents").json()["id"] == set_id
    found = client.post("/v1/embeddings/@prod-latents/search",
                        json={"vector": [0, 0, 0], "k": 3}).json()
    assert found["results"] == client.post(f"/v1/embeddings/{set_id}/search",
                                           json={"vector": [0, 0, 0], "k": 3}).json()["results"]
    key = client.get(f"/v1/embeddings/{set_id}/outliers", params={"k": 1}).json()[
        "results"][0]["key"]
    by_alias = client.post("/v1/models/@prod/traverse", json={
        "embedding_id": "@prod-latents", "key": key, "top": 2, "steps": 3})
    assert by_alias.status_code == 200, by_alias.text
    assert by_alias.json() == client.post(f"/v1/models/{b}/traverse", json={
        "embedding_id": set_id, "key": key, "top": 2, "steps": 3}).json()
    names = [x["name"] for x in client.get("/v1/aliases", params={"kind": "embedding_set"}
                                           ).json()]
    assert "prod-latents" in names and "prod" not in names
    for ref in ("prod-latents", "prod"):
        assert client.delete(f"/v1/aliases/{ref}").status_code == 204


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), [
    ("PUT", "/v1/aliases/Prod", {"model_id": 1}, 422, "name"),
    ("PUT", "/v1/aliases/ok", {"model_id": 1, "embedding_set_id": 1}, 422, "exactly one"),
    ("PUT", "/v1/aliases/ok", {}, 422, "exactly one"),
    ("PUT", "/v1/aliases/ok", {"model_id": 2**62}, 404, "does not exist"),
    ("GET", "/v1/aliases/nothing-here", None, 404, "alias 'nothing-here' does not exist"),
    ("GET", "/v1/models/@nothing-here", None, 404, "alias 'nothing-here' does not exist"),
    ("GET", "/v1/models/@Bad", None, 422, "model_id"),
    ("DELETE", "/v1/aliases/nothing-here", None, 404, "does not exist"),
])
def test_bad_alias_requests_name_what_is_wrong(client, method, path, body, status, words):
    answer = client.request(method, path, json=body)
    assert answer.status_code == status, answer.text
    assert words in answer.json()["error"]["message"], answer.text


def test_an_alias_of_the_wrong_kind_is_a_404_naming_it(client, models):
    client.put("/v1/aliases/kind-check", json={"model_id": models[0]})
    answer = client.get("/v1/embeddings/@kind-check")
    assert answer.status_code == 404
    assert answer.json()["error"]["message"] == (
        f"alias 'kind-check' names model {models[0]}, not an embedding set")
    client.delete("/v1/aliases/kind-check")


def test_a_read_key_cannot_move_an_alias(api, keys, models):
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {keys['read']}"}
                      ) as c:
        assert c.put("/v1/aliases/x", json={"model_id": models[0]}).status_code == 403
        assert c.delete(f"/v1/models/{models[0]}").status_code == 403


def test_delete_is_refused_while_aliased_then_forgets_the_model(client, models, api_db):
    a, _ = models
    set_id = a_set(api_db, a)
    assert decode(client, a).status_code == 200  # the model is in the API's caches now
    client.put("/v1/aliases/guard", json={"embedding_set_id": set_id})
    for path in (f"/v1/models/{a}", f"/v1/embeddings/{set_id}"):
        answer = client.delete(path)
        assert answer.status_code == 409 and "alias 'guard'" in answer.text, answer.text
    assert decode(client, a).status_code == 200  # nothing went
    assert client.delete("/v1/aliases/guard").status_code == 204
    assert client.delete(f"/v1/embeddings/{set_id}").status_code == 204
    assert client.get(f"/v1/embeddings/{set_id}").status_code == 404
    assert client.delete(f"/v1/models/{a}").status_code == 204
    for path in (f"/v1/models/{a}", f"/v1/models/{a}/onnx/decoder"):
        assert client.get(path).status_code == 404
    answer = decode(client, a)  # not answered from a cached session
    assert answer.status_code == 404 and f"model {a} does not exist" in answer.text
    assert client.delete(f"/v1/models/{a}").status_code == 404


def test_an_embedding_job_takes_the_model_by_alias(client, models, api_worker, api_db):
    from store.registry import get_model

    b = models[1]
    client.put("/v1/aliases/embedder", json={"model_id": b})
    answer = client.post("/v1/embedding-jobs", json={
        "model_id": "@embedder", "dataset_id": get_model(api_db, b).dataset_id})
    assert answer.status_code == 202, answer.text
    assert answer.json()["model_id"] == b
    job = answer.json()
    for _ in range(300):
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] in ("succeeded", "failed"):
            break
        time.sleep(0.2)
    assert job["status"] == "succeeded", job["error"]
    assert client.post("/v1/embedding-jobs", json={"model_id": "@nope", "dataset_id": 1}
                       ).status_code == 404
    client.delete("/v1/aliases/embedder")
