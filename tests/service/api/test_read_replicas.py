"""The API with a read replica (LATENTBANK_DATABASE_READ_URL) on a real streaming standby:
searches (by id and by alias), exports, outliers and key checks answered from it, also
while the primary is stopped (readiness says `degraded`, writes and primary-only reads
answer 503), and the primary answering again once it is back. An image search reads its
model and dataset rows from the replica too."""

import contextlib
import json
import time

import httpx
import numpy as np
import pytest

from store.keys import create_key
from store.registry import get_model
from store.tables import Model
from tests.service.api.test_image_queries import generated_pixels, png, register_images, values
from tests.store.sets import ready_set, write_latents
from tests.support import Served, settings_of, store_untrained_model, wait, whole_stack

MODEL = {"input_shape": [4], "latent_dim": 3, "hidden": [8]}
N_ITEMS = 64
IMAGE_MODEL = {"input_shape": [3, 8, 8], "latent_dim": 4, "hidden": [16],
               "likelihood": "gaussian"}


@pytest.fixture(scope="module")
@whole_stack
def replicated_api(pair, api_env, tmp_path_factory):
    data = tmp_path_factory.mktemp("replicated-api")
    settings = settings_of(api_env, database_url=pair.primary_url,
                           database_read_url=[pair.replica_url], database_read_max_lag_s=2.0,
                           database_read_check_s=0.2, data_dir=data / "data",
                           artifacts=(data / "artifacts").as_uri())
    from service.api.app import create_app

    served = Served(create_app(settings))
    yield served, settings
    served.stop()


def lagging_zero(client):
    checks = client.get("/readyz").json()["checks"]
    return "1 of 1 answering" in checks.get("replicas", "") and "lag 0.0 s" in checks["replicas"]


def replica_reads(client):
    for line in client.get("/metrics").text.splitlines():
        if line.startswith('latentbank_db_reads_total{server="replica"}'):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def primary_stopped(pair, client):
    """The pair's primary stopped, and seen down by the API's lag check, for the block;
    then started again (also when the block fails) and answering."""
    pair.stop_primary()
    try:
        wait("the lag check to see the primary down",
             lambda: client.get("/readyz").json()["status"] == "degraded", timeout=30)
        yield
    finally:
        pair.start_primary()
    wait("the primary to be back",
         lambda: client.get("/readyz").json()["status"] == "ok", timeout=30)


def nearest(mu, query, k):
    return [int(i) for i in np.argsort(((mu - query) ** 2).sum(1), kind="stable")[:k]]


def test_searches_are_answered_by_the_replica_also_while_the_primary_is_stopped(
        pair, primary, replicated_api, tmp_path):
    served, settings = replicated_api
    model_id = store_untrained_model(primary, settings, str(tmp_path), MODEL)[0]
    mu = np.random.default_rng(5).normal(size=(N_ITEMS, 3)).astype(np.float32)
    elbo = -np.arange(N_ITEMS, dtype=np.float64)  # item i is the i-th least likely from the end

    def write(set_id):
        write_latents(primary, set_id, 0, mu, mu, elbo, elbo, np.zeros(N_ITEMS))

    set_id = ready_set(primary, model_id, get_model(primary, model_id).dataset_id, write)
    used, fresh = (create_key(primary, name, ["write"]).key for name in ("used", "fresh"))
    query = [0.2, -0.1, 0.4]
    with httpx.Client(base_url=served.url, timeout=30,
                      headers={"Authorization": f"Bearer {used}"}) as client:
        assert client.put("/v1/aliases/replicated", json={"embedding_set_id": set_id}
                          ).status_code == 201
        wait("the replica to be measured caught up", lambda: lagging_zero(client), timeout=30)
        before = replica_reads(client)
        answer = client.post(f"/v1/embeddings/{set_id}/search", json={"vector": query, "k": 5})
        assert answer.status_code == 200, answer.text
        assert [h["index"] for h in answer.json()["results"]] == nearest(mu, query, 5)
        assert replica_reads(client) == before + 1

        with primary_stopped(pair, client):
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["database"] != "ok"
            answer = client.post(f"/v1/embeddings/{set_id}/search", json={"vector": query, "k": 5})
            assert answer.status_code == 200, answer.text
            assert [h["index"] for h in answer.json()["results"]] == nearest(mu, query, 5)
            by_alias = client.post("/v1/embeddings/@replicated/search",
                                   json={"vector": query, "k": 5})
            assert by_alias.status_code == 200, by_alias.text
            assert by_alias.json()["results"] == answer.json()["results"]
            worst = client.get(f"/v1/embeddings/{set_id}/outliers", params={"k": 3})
            assert worst.status_code == 200, worst.text
            assert [h["index"] for h in worst.json()["results"]] == [N_ITEMS - 1, N_ITEMS - 2,
                                                                     N_ITEMS - 3]
            rows = [json.loads(line) for line in
                    client.get(f"/v1/embeddings/{set_id}/export").text.splitlines()]
            assert sorted(r["index"] for r in rows) == list(range(N_ITEMS))
            assert np.allclose([r["mu"] for r in sorted(rows, key=lambda r: r["index"])], mu)
            # what writes, or reads what was just written, needs the primary: 503, nothing lost
            for refused in (client.delete(f"/v1/embeddings/{set_id}"),
                            client.get("/v1/embeddings")):
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "database_unavailable"
            # a key first used now is checked on the replica
            first_use = client.post(f"/v1/embeddings/{set_id}/search",
                                    json={"vector": query, "k": 2},
                                    headers={"Authorization": f"Bearer {fresh}"})
            assert first_use.status_code == 200, first_use.text
            unknown = client.post(f"/v1/embeddings/{set_id}/search", json={"vector": query},
                                  headers={"Authorization": "Bearer " + used[:-4] + "zzzz"})
            assert unknown.status_code == 401
        assert client.get(f"/v1/embeddings/{set_id}").json()["n_items"] == N_ITEMS


def test_an_image_search_reads_its_model_and_dataset_from_the_replica(
        pair, primary, replicated_api, tmp_path):
    """With the primary stopped, a search by image of a model this process has not served
    yet: the model's row, the dataset's image transform and the search all come from the
    replica, and the model read there is not cached (a replica may trail a deletion)."""
    import onnxruntime as ort

    from store.settings import open_artifacts

    served, settings = replicated_api
    pixels, labels = generated_pixels(12, seed=9)
    ds, _ = register_images(primary, settings, f"replicated-{time.monotonic_ns()}", pixels,
                            labels)
    model_id = store_untrained_model(primary, settings, str(tmp_path), IMAGE_MODEL)[0]
    with primary.session() as s:
        s.get(Model, model_id).dataset_id = ds.id
    mu = np.random.default_rng(11).normal(size=(len(pixels), 4)).astype(np.float32)
    zeros = np.zeros(len(pixels))
    set_id = ready_set(primary, model_id, ds.id,
                       lambda sid: write_latents(primary, sid, 0, mu, mu, zeros, zeros, zeros))
    artifacts = open_artifacts(settings)
    encoder = ort.InferenceSession(
        artifacts.local_path(artifacts.key_of(get_model(primary, model_id).encoder_uri)),
        providers=["CPUExecutionProvider"])
    query = encoder.run(None, {encoder.get_inputs()[0].name: values(pixels[4:5])})[0][0]
    key = create_key(primary, "images", ["read"]).key
    svc = served.server.config.app.state.services
    with httpx.Client(base_url=served.url, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as client:
        wait("the replica to be measured caught up", lambda: lagging_zero(client), timeout=30)
        with primary_stopped(pair, client):
            answer = client.post(f"/v1/embeddings/{set_id}/search", content=png(pixels[4]),
                                 params={"k": 5, "exact": "true"},
                                 headers={"Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
            assert [h["index"] for h in answer.json()["results"]] == nearest(mu, query, 5)
            assert svc.ready_models.get(model_id) is None
