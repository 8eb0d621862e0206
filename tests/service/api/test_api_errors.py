"""Every error status the API promises, with its JSON shape, and nothing stored is lost."""

import io
import socket

import httpx
import numpy as np
import pytest

from tests.support import Served, settings_of


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def error_of(answer, status, code=None, *words):
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    if code:
        assert body["error"]["code"] == code, body
    for word in words:
        assert word in body["error"]["message"], body
    for leak in ("Traceback", "/tmp", "/work", "SELECT", "psycopg"):
        assert leak not in body["error"]["message"], body
    return body["error"]["message"]


@pytest.fixture(scope="module")
def dataset(client):
    answer = client.post("/v1/datasets", json={"name": "digits-errors", "builtin": "digits"})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()


@pytest.fixture(scope="module")
def pending_model(client, dataset, api_db):
    """A model row that is not ready (its job is cancelled before any worker sees it)."""
    job = client.post("/v1/training-jobs", json={
        "dataset_id": dataset["id"], "model": {"family": "mlp", "latent_dim": 2},
        "training": {"epochs": 1}}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    return job["model_id"]


def test_401_without_or_with_an_unknown_key(anonymous):
    error_of(anonymous.get("/v1/datasets"), 401, "unauthorized", "Authorization: Bearer")
    answer = anonymous.get("/v1/datasets", headers={"Authorization": "Bearer lb_nope"})
    error_of(answer, 401, "unauthorized", "unknown")
    assert answer.headers["www-authenticate"] == "Bearer"
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/metrics").status_code == 200


def test_403_when_the_key_lacks_the_scope(anonymous, keys, dataset):
    read = {"Authorization": f"Bearer {keys['read']}"}
    assert anonymous.get("/v1/datasets", headers=read).status_code == 200
    error_of(anonymous.post("/v1/datasets", headers=read,
                            json={"name": "x", "builtin": "digits"}), 403, "forbidden", "write")
    write = {"Authorization": f"Bearer {keys['write']}"}
    error_of(anonymous.get("/v1/keys", headers=write), 403, "forbidden", "admin")


def test_admin_keys_create_list_and_revoke(anonymous, keys):
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    made = anonymous.post("/v1/keys", headers=admin, json={"name": "ci", "scopes": ["read"]})
    assert made.status_code == 201
    secret = made.json()["key"]
    mine = {"Authorization": f"Bearer {secret}"}
    assert anonymous.get("/v1/models", headers=mine).status_code == 200
    listed = anonymous.get("/v1/keys", headers=admin).json()
    assert all("key" not in k for k in listed) and any(k["name"] == "ci" for k in listed)
    assert anonymous.delete(f"/v1/keys/{made.json()['id']}", headers=admin).status_code == 200
    error_of(anonymous.get("/v1/models", headers=mine), 401, "unauthorized")


def test_404_for_unknown_rows(client):
    for path in ("/v1/datasets/999999", "/v1/jobs/999999", "/v1/models/999999",
                 "/v1/embeddings/999999", "/v1/models/999999/metrics",
                 "/v1/jobs/999999/events", "/v1/no-such-route"):
        error_of(client.get(path), 404, None)
    error_of(client.post("/v1/training-jobs", json={"dataset_id": 999999, "model": {
        "family": "mlp", "latent_dim": 2}}), 404, "not_found", "dataset 999999")


def test_409_for_state_conflicts(client, dataset, pending_model):
    error_of(client.post(f"/v1/models/{pending_model}/decode", json={"z": [[0, 0]]}), 409,
             "conflict", "not ready")
    error_of(client.get(f"/v1/models/{pending_model}/onnx/decoder"), 409, "conflict")
    error_of(client.post("/v1/embedding-jobs", json={
        "model_id": pending_model, "dataset_id": dataset["id"]}), 409, "conflict", "not ready")
    job = client.get("/v1/jobs", params={"model_id": pending_model}).json()[0]
    assert job["status"] == "cancelled"
    error_of(client.post(f"/v1/jobs/{job['id']}/cancel"), 409, "conflict", "cancelled")
    # the dataset is used by a model: refused, and still there afterwards
    error_of(client.delete(f"/v1/datasets/{dataset['id']}"), 409, "conflict", "model")
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["n_items"] == 1797


def test_cancel_of_a_queued_job_answers_its_new_state(client, dataset):
    job = client.post("/v1/training-jobs", json={
        "dataset_id": dataset["id"], "model": {"family": "mlp", "latent_dim": 2},
        "training": {"epochs": 1}}).json()
    answer = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 200
    assert answer.json()["status"] in ("cancelled", "running")
    assert answer.json()["cancel_requested"] is True


def test_413_by_content_length_and_for_chunked_bodies(client, api_settings):
    big = b"\0" * (api_settings.max_upload_bytes + 1)
    error_of(client.post("/v1/datasets", files={"file": ("big.npy", big)}), 413, "too_large")

    def upload():  # a chunked multipart upload: the parser stops at the limit
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.npy"\r\n\r\n'
        for _ in range(api_settings.max_upload_bytes // 65536 + 2):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    answer = client.post("/v1/datasets", content=upload(),
                         headers={"Content-Type": "multipart/form-data; boundary=b"})
    error_of(answer, 413, "too_large", str(api_settings.max_upload_bytes))
    assert not any(d["name"] == "x" for d in client.get("/v1/datasets").json())

    def chunks():  # no Content-Length: the server must count
        for _ in range(api_settings.max_request_bytes // 65536 + 2):
            yield b"[" * 65536

    answer = client.post("/v1/models/1/decode", content=chunks(),
                         headers={"Content-Type": "application/json"})
    assert answer.request.headers.get("transfer-encoding") == "chunked"
    error_of(answer, 413, "too_large", str(api_settings.max_request_bytes))


def test_415_for_formats_we_do_not_read(client):
    error_of(client.post("/v1/datasets", files={"file": ("notes.txt", b"hello")}), 415,
             "unsupported_format", ".txt")
    error_of(client.post("/v1/datasets", content=b"x", headers={"Content-Type": "text/plain"}),
             415, "unsupported_format", "text/plain")
    error_of(client.post("/v1/models/1/decode", content=b"z",
                         headers={"Content-Type": "text/csv"}), 415, None, "text/csv")


@pytest.mark.parametrize(("body", "words"), [
    ({"dataset_id": 1}, ["model", "Field required"]),
    ({"dataset_id": 1, "model": {"family": "mlp", "latent_dim": 0}}, ["latent_dim"]),
    ({"dataset_id": 1, "model": {"family": "transformer", "latent_dim": 2}}, ["family"]),
    ({"dataset_id": 1, "model": {"family": "mlp", "latent_dim": 2},
      "training": {"epochs": -1}}, ["epochs"]),
    ({"dataset_id": "one", "model": {}}, ["dataset_id"]),
])
def test_422_for_bad_training_submissions(client, dataset, body, words):
    body = {**body, "dataset_id": dataset["id"]} if body["dataset_id"] == 1 else body
    error_of(client.post("/v1/training-jobs", json=body), 422, "invalid_input", *words)


def test_422_for_bad_datasets_and_nothing_is_lost(client, dataset):
    before = client.get("/v1/datasets").json()
    bad = np.ones((4, 3), np.float32)
    bad[1, 2] = np.nan
    error_of(client.post("/v1/datasets", data={"name": "nan"},
                         files={"file": ("nan.npy", npy(bad))}), 422, "invalid_dataset",
             "not finite")
    error_of(client.post("/v1/datasets", data={"name": "pickled"},
                         files={"file": ("obj.npy", b"\x93NUMPY" + b"\0" * 60)}), 422)
    error_of(client.post("/v1/datasets", files={"file": ("x.npy", npy(np.ones((3, 2))))},
                         data={"name": "dup", "keys": "no"}), 422)
    error_of(client.post("/v1/datasets", json={"name": "etc", "uri": "/etc/passwd"}), 422,
             "path_not_allowed", "outside the allowed roots")
    error_of(client.post("/v1/datasets", json={"name": dataset["name"], "builtin": "digits",
                                               "extra": 1}), 422, "invalid_input", "extra")
    error_of(client.post("/v1/datasets", content=b"{not json",
                         headers={"Content-Type": "application/json"}), 422, None, "JSON")
    assert client.get("/v1/datasets").json() == before


def test_a_taken_name_is_a_conflict(client, dataset):
    answer = client.post("/v1/datasets", data={"name": dataset["name"]},
                         files={"file": ("o.npy", npy(np.ones((3, 2), np.float32)))})
    error_of(answer, 409, "conflict", "already exists")


@pytest.fixture(scope="module")
def ready_model(client, api_worker, dataset):
    job = client.post("/v1/training-jobs", json={
        "dataset_id": dataset["id"], "model": {"family": "mlp", "latent_dim": 3, "hidden": [16]},
        "training": {"epochs": 1}}).json()
    for _ in range(600):
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        import time

        time.sleep(0.2)
    assert job["status"] == "succeeded", job
    return job["model_id"]


@pytest.mark.parametrize(("body", "words"), [
    ({"z": [[0, 0]]}, ["3 values", "latent_dim"]),
    ({"z": [[0, 0, "a"]]}, ["z"]),
    ({"z": []}, ["at least one row"]),
    ({"z": [[0, 1, 2], [3]]}, ["z"]),
    ({"zz": [[0, 0, 0]]}, ["z"]),
])
def test_422_for_bad_latents(client, ready_model, body, words):
    error_of(client.post(f"/v1/models/{ready_model}/decode", json=body), 422, "invalid_input",
             *words)


def test_422_for_non_finite_oversized_or_pickled_npy_latents(client, ready_model, api_settings):
    z = np.zeros((2, 3), np.float32)
    z[0, 1] = np.inf
    headers = {"Content-Type": "application/x-npy"}
    error_of(client.post(f"/v1/models/{ready_model}/decode", content=npy(z), headers=headers),
             422, "invalid_input", "non-finite")
    many = np.zeros((api_settings.decode_max_rows + 1, 3), np.float32)
    error_of(client.post(f"/v1/models/{ready_model}/decode", content=npy(many),
                         headers=headers), 422, "invalid_input", "limit")
    buffer = io.BytesIO()  # an object array: a header that announces a pickle, then one
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    buffer.write(b"\x80\x04N.")
    error_of(client.post(f"/v1/models/{ready_model}/decode", content=buffer.getvalue(),
                         headers=headers), 422, "invalid_input", "object arrays")
    error_of(client.post(f"/v1/models/{ready_model}/encode", json={"x": [[0.5] * 63]}), 422,
             "invalid_input", "[1, 8, 8]")
    error_of(client.post(f"/v1/models/{ready_model}/sample", json={"n": 0}), 422)
    error_of(client.post(f"/v1/models/{ready_model}/interpolate", json={"z_from": [0, 0, 0]}),
             422, "invalid_input", "z_to")


def test_406_for_png_of_non_images(client, ready_model):
    answer = client.post(f"/v1/models/{ready_model}/encode", json={"x": [[0.5] * 64]},
                         headers={"Accept": "image/png"})
    error_of(answer, 406, "not_acceptable")


def _dead_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broker_down_a_submission_still_answers_202(api_env, keys, client, dataset):
    from service.api.app import create_app

    settings = settings_of(api_env, redis_url=f"redis://127.0.0.1:{_dead_port()}/0")
    served = Served(create_app(settings))
    try:
        with httpx.Client(base_url=served.url, timeout=30,
                          headers={"Authorization": f"Bearer {keys['write']}"}) as c:
            answer = c.post("/v1/training-jobs", json={
                "dataset_id": dataset["id"], "model": {"family": "mlp", "latent_dim": 2},
                "training": {"epochs": 1}})
            assert answer.status_code == 202, answer.text
            assert answer.json()["status"] == "queued" and not answer.json()["published"]
            ready = c.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["database"] == "ok"
            assert ready.json()["checks"]["broker"].startswith("unavailable")
            job_id = answer.json()["id"]
    finally:
        served.stop()
    # the running stack (broker up) publishes it through the workers' maintenance
    client.post(f"/v1/jobs/{job_id}/cancel")


@pytest.mark.stack  # starts uvicorn itself
def test_database_down_answers_503(api_env, keys):
    from service.api.app import create_app

    settings = settings_of(api_env, database_url=f"postgresql://u:secret@127.0.0.1:"
                                                 f"{_dead_port()}/none", db_connect_timeout=2)
    served = Served(create_app(settings))
    try:
        with httpx.Client(base_url=served.url, timeout=30,
                          headers={"Authorization": f"Bearer {keys['read']}"}) as c:
            for path in ("/v1/datasets", "/v1/jobs/1", "/v1/models"):
                message = error_of(c.get(path), 503, "database_unavailable")
                assert "secret" not in message
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200
            assert c.get("/metrics").status_code == 200
    finally:
        served.stop()
