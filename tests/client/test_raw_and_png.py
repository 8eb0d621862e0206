"""Units over httpx.MockTransport: results keep the API's JSON as it came (`raw`), the
PNG variants of decode/sample/traverse ask for image/png and hand back its bytes, and an
alias set says whether the call made it."""

import io
import json

import httpx
import numpy as np
import pytest
from latentbank_client import Client, EmbeddingSet
from latentbank_client.display import PNG
from latentbank_client.results import build

URL = "http://api.test"
MODEL = {"id": 3, "status": "ready", "dataset_id": 1,
         "config": {"model": {"latent_dim": 2, "input_shape": [1, 2, 2]}},
         "a_field_this_client_does_not_know": [1, 2]}
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"pretend-image"


def make(handler):
    return Client(url=URL, key="k", transport=httpx.MockTransport(handler))


def test_raw_is_the_answer_as_it_came_unknown_fields_included():
    answers = {
        "/v1/models/3": MODEL,
        "/v1/models/3/metrics": [{"epoch": 1, "split": "val", "elbo": -1.5,
                                  "reconstruction": -1.0, "kl": 0.5, "new_figure": 7}],
        "/v1/embeddings/4/search": {"results": [{"key": "a", "index": 0, "distance": 0.25}],
                                    "plan": "hnsw", "extra": True},
        "/v1/keys": [{"id": 1, "name": "admin", "prefix": "lb_ab", "scopes": ["admin"],
                      "created_at": "2026-01-01T00:00:00Z", "note": "x"}],
    }

    def handler(request):
        return httpx.Response(200, json=answers[request.url.path])

    with make(handler) as c:
        model = c.models.get(3)
        assert model.raw == MODEL and model.id == 3
        metrics = model.metrics()
        assert [m.raw for m in metrics] == answers["/v1/models/3/metrics"]
        found = build(EmbeddingSet, {"id": 4, "dim": 2}, c).search(key="a")
        assert found.raw == answers["/v1/embeddings/4/search"] and found.plan == "hnsw"
        assert [h.key for h in found] == ["a"]
        (key,) = c.keys.list()
        assert key.raw == answers["/v1/keys"][0]
        assert key.created_at.year == 2026  # the typed field is still parsed


def test_png_variants_ask_for_image_png_and_return_its_bytes():
    seen = []

    def handler(request):
        if request.method == "GET":
            return httpx.Response(200, json=MODEL)
        seen.append((request.url.path, request.headers["accept"], request.content))
        return httpx.Response(200, content=PNG_BYTES, headers={"content-type": "image/png"})

    with make(handler) as c:
        model = c.models.get(3)
        z = np.array([[0.5, -1.0], [2.0, 0.0]], dtype=np.float32)
        for png in (model.decode_png(z), model.sample_png(4, seed=1, temperature=0.5),
                    model.traverse_png(top=2, steps=3, span=1.5)):
            assert isinstance(png, PNG) and png.data == PNG_BYTES
    (decode, sample, traverse) = seen
    assert [s[:2] for s in seen] == [("/v1/models/3/decode", "image/png"),
                                     ("/v1/models/3/sample", "image/png"),
                                     ("/v1/models/3/traverse", "image/png")]
    sent = np.load(io.BytesIO(decode[2]), allow_pickle=False)
    assert sent.dtype == np.float32 and sent.tolist() == [[0.5, -1.0], [2.0, 0.0]]
    assert json.loads(sample[2]) == {"n": 4, "seed": 1, "temperature": 0.5}
    assert json.loads(traverse[2]) == {"top": 2, "steps": 3, "span": 1.5}


def test_decode_png_checks_the_latent_width_before_any_request():
    def handler(request):
        if request.method == "GET":
            return httpx.Response(200, json=MODEL)
        raise AssertionError("nothing is sent")

    with make(handler) as c:
        model = c.models.get(3)
        with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
            model.decode_png(np.zeros((2, 3)))


@pytest.mark.parametrize(("status", "created"), [(201, True), (200, False)])
def test_an_alias_set_says_whether_it_made_the_alias(status, created):
    alias = {"name": "prod", "kind": "model", "target_id": 3, "history": [
        {"action": "created", "kind": "model", "target_id": 3}]}

    def handler(request):
        assert request.method == "PUT" and json.loads(request.content) == {"model_id": 3}
        return httpx.Response(status, json=alias)

    with make(handler) as c:
        got = c.aliases.set("prod", model=3)
    assert got.created is created and got.target_id == 3 and got.raw == alias


def test_train_and_sweep_pass_the_registered_model_name_only_when_given():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        job = {"id": 1, "kind": "train", "status": "queued", "params": {},
               "mlflow": {"in_sync": False}}
        return httpx.Response(202, json=job if request.url.path.endswith("jobs")
                              else {"sweep_id": "s", "jobs": [job]})

    with make(handler) as c:
        job = c.models.train(1, model={"family": "mlp"}, registered_model="faces")
        c.models.train(1, model={"family": "mlp"})
        c.models.sweep(1, {"family": "mlp"}, None, {"model.latent_dim": [2]},
                       registered_model="faces")
    assert [b.get("registered_model") for b in bodies] == ["faces", None, "faces"]
    assert "registered_model" not in bodies[1]
    assert job.mlflow == {"in_sync": False}
