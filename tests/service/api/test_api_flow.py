"""The whole flow over HTTP: upload -> train -> embed -> search -> decode, each answer
checked against an independent computation (onnxruntime on the downloaded files, numpy
brute force over the exported latents, the prior draws recomputed here)."""

import datetime as dt
import io
import json
import math

import httpx
import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.support import wait_job

pytestmark = pytest.mark.slow

MODEL = {"family": "mlp", "latent_dim": 4, "hidden": [64], "likelihood": "bernoulli"}
TRAINING = {"epochs": 24, "batch_size": 64, "lr": 0.003, "seed": 3, "val_fraction": 0.1,
            "importance_samples": 20}


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def sse_events(client, path):
    """(event, data) pairs of a server-sent event stream, read to its end."""
    events, name = [], None
    with client.stream("GET", path, timeout=300) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: "):])))
    return events


FOLDER_KEY = "class 4/d 0042.png"


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[:, None], d.target.astype(np.int64)


@pytest.fixture(scope="module")
def flow(client, api_worker, digits):
    """Upload, train (watched through SSE), embed: the state the tests below read."""
    images, labels = digits
    keys = np.array([f"d{i:04d}" for i in range(len(images))], dtype=object)
    keys[42] = FOLDER_KEY  # an image folder's key: a path, with a space
    keys = keys.astype(str)
    answer = client.post("/v1/datasets", data={"name": "digits-upload"}, files={
        "file": ("digits.npy", npy(images), "application/octet-stream"),
        "labels": ("labels.npy", npy(labels)), "keys": ("keys.npy", npy(keys))})
    assert answer.status_code == 201, answer.text
    dataset = answer.json()
    assert answer.headers["location"] == f"/v1/datasets/{dataset['id']}"

    answer = client.post("/v1/training-jobs", json={
        "dataset_id": dataset["id"], "model": MODEL, "training": TRAINING})
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running") and job["published"]
    events = sse_events(client, f"/v1/jobs/{job['id']}/events")
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded", events[-1]
    model_id = events[-1][1]["model_id"]
    # every epoch counted (early stopping may end it sooner: then all that ran)
    ended = events[-1][1]
    assert ended["items_total"] == TRAINING["epochs"]
    assert 1 <= ended["items_done"] <= TRAINING["epochs"]

    answer = client.post("/v1/embedding-jobs", json={
        "model_id": model_id, "dataset_id": dataset["id"], "importance_samples": 10})
    assert answer.status_code == 202, answer.text
    embed = wait_job(client, answer.json()["id"])
    assert embed["status"] == "succeeded", embed
    assert embed["items_done"] == embed["items_total"] == len(images)  # every shard counted
    return {"dataset": dataset, "model_id": model_id, "train_events": events,
            "set_id": embed["embedding_set_id"], "keys": keys}


@pytest.fixture(scope="module")
def onnx_files(client, flow, tmp_path_factory):
    folder = tmp_path_factory.mktemp("downloaded")
    paths = {}
    for role in ("encoder", "decoder"):
        answer = client.get(f"/v1/models/{flow['model_id']}/onnx/{role}")
        assert answer.status_code == 200
        paths[role] = folder / f"{role}.onnx"
        paths[role].write_bytes(answer.content)
    return {role: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            for role, p in paths.items()}


@pytest.fixture(scope="module")
def exported(client, flow):
    rows = []
    with client.stream("GET", f"/v1/embeddings/{flow['set_id']}/export") as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line:
                rows.append(json.loads(line))
    return rows


def test_upload_answers_the_dataset(flow, digits):
    d = flow["dataset"]
    assert d["n_items"] == len(digits[0]) and d["item_shape"] == [1, 8, 8]
    assert d["has_labels"] and d["source_format"] == "npy"
    assert d["min_value"] == float(digits[0].min()) and d["max_value"] == float(digits[0].max())


def test_training_events_report_progress_to_the_end(flow, client):
    events = flow["train_events"]
    progress = [data["progress"] for name, data in events if name == "progress"]
    assert progress == sorted(progress) and progress[-1] == 1.0
    end = events[-1][1]
    ran = (dt.datetime.fromisoformat(end["finished_at"])
           - dt.datetime.fromisoformat(end["started_at"])).total_seconds()
    # the worker writes progress with its lease heartbeat, every min(2, 5 / 3) s here,
    # and the events poll every 0.2 s: a run this long shows progress on the way
    if ran > 2 * 5 / 3 + 0.5:
        assert any(0 < p < 1 for p in progress), f"no intermediate progress in {ran:.1f} s"
    model = client.get(f"/v1/models/{flow['model_id']}").json()
    assert model["status"] == "ready" and model["config"]["model"]["latent_dim"] == 4
    rows = client.get(f"/v1/models/{flow['model_id']}/metrics").json()
    val = [r for r in rows if r["split"] == "val"]
    assert [r["epoch"] for r in val] == list(range(1, 25))
    for r in rows:  # the ELBO's parts, as stored, add up
        assert r["elbo"] == pytest.approx(r["reconstruction"] - r["kl"], abs=1e-6)
    assert all(r["log_px"] >= r["elbo"] - 1e-6 for r in val)  # IWAE bound >= ELBO
    assert val[-1]["elbo"] > val[0]["elbo"]


def test_decode_equals_onnxruntime_on_the_downloaded_file(client, flow, onnx_files):
    z = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    expected = onnx_files["decoder"].run(["probs"], {"z": z})[0]
    answer = client.post(f"/v1/models/{flow['model_id']}/decode", json={"z": z.tolist()})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(np.asarray(answer.json()["x"]), expected, atol=1e-6)
    answer = client.post(f"/v1/models/{flow['model_id']}/decode", content=npy(z),
                         headers={"Content-Type": "application/x-npy",
                                  "Accept": "application/x-npy"})
    assert answer.headers["content-type"] == "application/x-npy"
    got = np.load(io.BytesIO(answer.content), allow_pickle=False)
    assert got.shape == (5, 1, 8, 8)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_concurrent_decodes_are_batched_and_each_gets_its_own_rows(client, flow, onnx_files,
                                                                   api):
    import concurrent.futures

    import httpx

    zs = np.random.default_rng(1).standard_normal((32, 3, 4)).astype(np.float32)
    headers = dict(client.headers)

    def call(z):
        with httpx.Client(base_url=api.url, headers=headers, timeout=60) as c:
            return np.asarray(c.post(f"/v1/models/{flow['model_id']}/decode",
                                     json={"z": z.tolist()}).json()["x"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, zs))
    for z, got in zip(zs, answers, strict=True):
        np.testing.assert_allclose(got, onnx_files["decoder"].run(["probs"], {"z": z})[0],
                                   atol=1e-6)


def test_sample_decodes_prior_draws_of_the_given_seed(client, flow, onnx_files):
    answer = client.post(f"/v1/models/{flow['model_id']}/sample",
                         json={"n": 6, "seed": 11, "temperature": 0.5}).json()
    z = (0.5 * np.random.default_rng(11).standard_normal((6, 4))).astype(np.float32)
    np.testing.assert_allclose(np.asarray(answer["z"]), z, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(answer["x"]),
                               onnx_files["decoder"].run(["probs"], {"z": z})[0], atol=1e-6)


def test_sample_as_png_is_a_grid_of_the_items(client, flow):
    answer = client.post(f"/v1/models/{flow['model_id']}/sample", json={"n": 16, "seed": 0},
                         headers={"Accept": "image/png"})
    assert answer.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(answer.content))
    # 16 items of 8x8 in one row, 1-pixel borders, scaled 4x
    assert image.size == ((16 * 9 + 1) * 4, 9 * 4 + 4)


def test_interpolation_between_stored_items_follows_the_great_circle(client, flow, onnx_files):
    a = np.asarray(client.get(f"/v1/embeddings/{flow['set_id']}/items/d0000").json()["mu"])
    # a key with a slash, as written and with the slash escaped (%2F): the same item
    b = np.asarray(client.get(f"/v1/embeddings/{flow['set_id']}/items/{FOLDER_KEY}").json()["mu"])
    escaped = client.get(f"/v1/embeddings/{flow['set_id']}/items/class%204%2Fd%200042.png")
    assert escaped.status_code == 200 and escaped.json()["key"] == FOLDER_KEY
    # a key PostgreSQL cannot hold (a NUL) is the caller's error, not the server's
    nul = client.get(f"/v1/embeddings/{flow['set_id']}/items/d%000000")
    assert nul.status_code == 422, nul.text
    answer = client.post(f"/v1/models/{flow['model_id']}/interpolate", json={
        "embedding_id": flow["set_id"], "from_key": "d0000", "to_key": FOLDER_KEY, "steps": 5,
        "method": "slerp"}).json()
    z = np.asarray(answer["z"])
    np.testing.assert_allclose(z[0], a, atol=1e-5)
    np.testing.assert_allclose(z[-1], b, atol=1e-5)
    # each step turns by the same angle, and the norm follows the slerp weights
    angle = np.arccos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for i, t in enumerate(np.linspace(0, 1, 5)):
        expected = (np.sin((1 - t) * angle) * a + np.sin(t * angle) * b) / np.sin(angle)
        np.testing.assert_allclose(z[i], expected, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(answer["x"]),
        onnx_files["decoder"].run(["probs"], {"z": z.astype(np.float32)})[0], atol=1e-6)
    linear = client.post(f"/v1/models/{flow['model_id']}/interpolate", json={
        "z_from": [0, 0, 0, 0], "z_to": [1, 2, 3, 4], "steps": 3}).json()
    np.testing.assert_allclose(linear["z"], [[0, 0, 0, 0], [.5, 1, 1.5, 2], [1, 2, 3, 4]])


def test_encode_and_reconstruct_equal_onnxruntime(client, flow, onnx_files, digits):
    x = digits[0][:7]
    mu, logvar = onnx_files["encoder"].run(["mu", "logvar"], {"x": x})
    answer = client.post(f"/v1/models/{flow['model_id']}/encode",
                         json={"x": x.reshape(7, -1).tolist()}).json()
    np.testing.assert_allclose(answer["mu"], mu, atol=1e-5)
    np.testing.assert_allclose(answer["logvar"], logvar, atol=1e-5)
    answer = client.post(f"/v1/models/{flow['model_id']}/reconstruct", content=npy(x),
                         headers={"Content-Type": "application/x-npy"}).json()
    expected = onnx_files["decoder"].run(["probs"], {"z": mu})[0]
    np.testing.assert_allclose(answer["x"], expected, atol=1e-5)


def test_a_halfvec_set_stores_float16_codes_and_answers_as_a_vector_set_does(
        client, flow, onnx_files, digits):
    images, _ = digits
    assert client.get(f"/v1/embeddings/{flow['set_id']}").json()["vector_type"] == "vector"
    refused = client.post("/v1/embedding-jobs", json={
        "model_id": flow["model_id"], "dataset_id": flow["dataset"]["id"],
        "vector_type": "float8"})
    assert refused.status_code == 422 and "vector_type" in refused.text
    job = wait_job(client, client.post("/v1/embedding-jobs", json={
        "model_id": flow["model_id"], "dataset_id": flow["dataset"]["id"],
        "vector_type": "halfvec"}).json()["id"])
    assert job["status"] == "succeeded", job
    set_id = job["embedding_set_id"]
    assert client.get(f"/v1/embeddings/{set_id}").json()["vector_type"] == "halfvec"
    rows = export_rows(client, set_id)
    stored = np.asarray([r["mu"] for r in rows], dtype=np.float32)
    # every value is a float16 (read back as float32), within float16's half-ulp (2^-11,
    # relative) of the encoder's code
    np.testing.assert_array_equal(stored.astype(np.float16).astype(np.float32), stored)
    mu = onnx_files["encoder"].run(["mu"], {"x": images})[0]
    np.testing.assert_allclose(stored, mu, rtol=2.0**-11, atol=1e-4)
    q = np.random.default_rng(12).standard_normal(4)
    answer = client.post(f"/v1/embeddings/{set_id}/search",
                         json={"vector": q.tolist(), "k": 10, "exact": True}).json()
    keys, distances = brute_force(rows, q.astype(np.float16).astype(np.float64), 10)
    assert [h["key"] for h in answer["results"]] == keys
    np.testing.assert_allclose([h["distance"] for h in answer["results"]], distances,
                               rtol=1e-5)


def test_stored_codes_equal_the_encoder_on_the_data(exported, onnx_files, digits, flow):
    assert len(exported) == len(digits[0])
    assert [r["key"] for r in exported] == list(flow["keys"])
    mu = onnx_files["encoder"].run(["mu"], {"x": digits[0]})[0]
    np.testing.assert_allclose(np.asarray([r["mu"] for r in exported]), mu, atol=1e-4)
    for r in exported[:50]:
        assert r["elbo"] == pytest.approx(r["reconstruction"] - r["kl"], abs=1e-4)
        assert r["label"] == str(digits[1][r["index"]])


def test_scores_of_new_items_agree_with_the_stored_ones_within_their_errors(client, flow,
                                                                             exported, digits):
    """/score runs the ONNX files in NumPy; the embedding job ran torch with its own draws
    (same K): the two estimates differ by noise whose spread the reported errors give."""
    n, k = 300, 10
    x = digits[0][:n]
    url = f"/v1/models/{flow['model_id']}/score"
    answer = client.post(url, content=npy(x), params={"importance_samples": k, "seed": 1},
                         headers={"Content-Type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text
    got = answer.json()
    assert got["n_items"] == n and got["importance_samples"] == k
    stored = exported[:n]
    # the KL is closed form from the same encoder file: equal up to float32 rounding
    np.testing.assert_allclose(got["kl"], [r["kl"] for r in stored], rtol=1e-4, atol=1e-4)
    for name, se in (("log_px", "log_px_se"), ("elbo", "elbo_se")):
        z = (np.asarray(got[name]) - [r[name] for r in stored]) / (
            math.sqrt(2) * np.asarray(got[se]))
        # The delta method's error runs small where a few weights dominate (heavy tails at
        # K = 10), so the spread is judged by the median |z| (0.67 for a normal; errors
        # far too small or too big leave 0.3..1.5) and the tails loosely; the count of
        # positive differences is Binomial(n, 1/2) (both sides are the same estimator):
        # a constant wrong on either side moves it far out of 90..210 (5.8 sd).
        assert 0.3 <= np.median(np.abs(z)) <= 1.5, (name, np.median(np.abs(z)))
        assert np.mean(np.abs(z) <= 3) >= 0.9, (name, np.sort(np.abs(z))[-10:])
        assert 90 <= np.sum(z > 0) <= 210, (name, np.sum(z > 0))
    assert all(1 <= e <= k for e in got["ess"])
    again = client.post(url, json={"x": x.reshape(n, -1).tolist()},
                        params={"importance_samples": k, "seed": 1}).json()
    assert again["log_px"] == got["log_px"]  # JSON or .npy, a seed replays the same draws


def test_score_with_fpr_flags_items_below_the_heldout_threshold(client, flow, digits):
    model = client.get(f"/v1/models/{flow['model_id']}").json()
    thresholds = model["summary"]["heldout_thresholds"]
    assert thresholds["statistic"] == "log_px"
    assert thresholds["importance_samples"] == TRAINING["importance_samples"]
    noise = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    x = np.concatenate([digits[0][:20], noise])
    got = client.post(f"/v1/models/{flow['model_id']}/score", params={"fpr": 0.01},
                      content=npy(x), headers={"Content-Type": "application/x-npy"}).json()
    t = got["threshold"]
    assert t["fpr"] == 0.01 and t["statistic"] == "log_px"
    assert t["value"] == pytest.approx(thresholds["by_fpr"]["0.01"])
    assert got["importance_samples"] == thresholds["importance_samples"]  # the held-out K
    assert got["is_outlier"] == [v < t["value"] for v in got["log_px"]]
    assert all(got["is_outlier"][20:]) and sum(got["is_outlier"][:20]) <= 3  # noise is odd


@pytest.mark.parametrize(("params", "rows", "status", "words"), [
    ({}, 1025, 413, ["1024", "embedding job"]),
    ({"importance_samples": 1000}, 300, 413, ["262144", "embedding job"]),
    ({"importance_samples": 5001}, 1, 422, ["importance_samples"]),
    ({"fpr": 0}, 1, 422, ["fpr"]),
    ({"fpr": 0.01, "importance_samples": 0}, 1, 422, ["importance_samples"]),
])
def test_score_limits_name_themselves(client, flow, params, rows, status, words):
    answer = client.post(f"/v1/models/{flow['model_id']}/score", params=params,
                         content=npy(np.zeros((rows, 64), np.float32)),
                         headers={"Content-Type": "application/x-npy"})
    assert answer.status_code == status, answer.text
    assert all(w in answer.json()["error"]["message"] for w in words), answer.text


def test_traversals_move_the_dimensions_with_most_kl_one_at_a_time(client, flow, exported,
                                                                   onnx_files):
    url = f"/v1/models/{flow['model_id']}/traverse"
    kl = client.get(f"/v1/models/{flow['model_id']}").json()["summary"]["kl_per_dim"]
    top = [int(d) for d in np.argsort(-np.asarray(kl), kind="stable")[:3]]
    item = exported[42]
    for body, base in (({"top": 3, "steps": 5, "span": 2.0}, np.zeros(4)),
                       ({"embedding_id": flow["set_id"], "key": item["key"], "top": 3,
                         "steps": 5, "span": 2.0}, np.asarray(item["mu"]))):
        got = client.post(url, json=body)
        assert got.status_code == 200, got.text
        got = got.json()
        assert got["dims"] == top and got["kl"] == pytest.approx([kl[d] for d in top])
        assert got["offsets"] == pytest.approx(np.linspace(-2, 2, 5).tolist())
        want = np.repeat(base[None], 15, axis=0)
        for row, d in enumerate(top):
            want[row * 5:(row + 1) * 5, d] += np.linspace(-2, 2, 5)
        np.testing.assert_allclose(got["z"], want, atol=1e-6)
        expected = onnx_files["decoder"].run(["probs"], {"z": want.astype(np.float32)})[0]
        np.testing.assert_allclose(got["x"], expected, atol=1e-5)
    png = client.post(url, json={"dims": [1, 0], "steps": 7}, headers={"Accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(png.content))
    assert image.size == ((7 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # rows = dims, columns = steps
    for body, words in (({"dims": [4]}, "[0, 4)"), ({"key": "x"}, "go together"),
                        ({"z": [0, 0, 0, 0], "embedding_id": 1, "key": "x"}, "not both"),
                        ({"z": [0, 0]}, "4 values"), ({"steps": 1}, "steps")):
        answer = client.post(url, json=body)
        assert answer.status_code == 422 and words in answer.text, (body, answer.text)


def test_parquet_export_equals_ndjson(client, flow, exported):
    answer = client.get(f"/v1/embeddings/{flow['set_id']}/export", params={"format": "parquet"})
    assert answer.status_code == 200
    table = pq.read_table(io.BytesIO(answer.content)).to_pylist()
    assert len(table) == len(exported)
    for a, b in zip(table[::97], exported[::97], strict=True):
        assert a["key"] == b["key"] and a["label"] == b["label"]
        np.testing.assert_allclose(a["mu"], b["mu"], rtol=1e-6)
        assert a["elbo"] == pytest.approx(b["elbo"]) and a["log_px"] == pytest.approx(
            b["log_px"])


def brute_force(rows, q, k, metric="l2", keep=lambda r: True):
    rows = [r for r in rows if keep(r)]
    mu = np.asarray([r["mu"] for r in rows], dtype=np.float64)
    if metric == "l2":
        d = np.linalg.norm(mu - q, axis=1)
    else:
        d = 1 - mu @ q / np.linalg.norm(mu, axis=1) / np.linalg.norm(q)
    order = np.argsort(d, kind="stable")[:k]
    return [rows[i]["key"] for i in order], d[order]


def test_search_equals_brute_force(client, flow, exported):
    q = np.random.default_rng(5).standard_normal(4)
    for metric in ("l2", "cosine"):
        answer = client.post(f"/v1/embeddings/{flow['set_id']}/search",
                             json={"vector": q.tolist(), "k": 10, "metric": metric}).json()
        keys, dist = brute_force(exported, q, 10, metric)
        assert [h["key"] for h in answer["results"]] == keys
        np.testing.assert_allclose([h["distance"] for h in answer["results"]], dist,
                                   rtol=1e-4, atol=1e-5)


def test_search_by_key_with_filters_equals_brute_force(client, flow, exported):
    query = next(r for r in exported if r["key"] == "d0007")
    lo = float(np.median([r["elbo"] for r in exported]))
    answer = client.post(f"/v1/embeddings/{flow['set_id']}/search", json={
        "key": "d0007", "k": 8, "filter": {"label": ["3", "5"], "elbo": [lo, None]}})
    assert answer.status_code == 200, answer.text
    keys, _ = brute_force(exported, np.asarray(query["mu"]), 8, keep=lambda r: (
        r["label"] in ("3", "5") and r["elbo"] >= lo and r["key"] != "d0007"))
    assert [h["key"] for h in answer.json()["results"]] == keys
    assert all(h["label"] in ("3", "5") for h in answer.json()["results"])


def test_batch_search_answers_each_query_as_brute_force_does(client, flow, exported):
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((3, 4))
    by_key = {r["key"]: r for r in exported}
    queries = [{"key": "d0007"}, {"vector": vectors[0].tolist()}, {"key": "d0100"},
               {"vector": vectors[1].tolist()}, {"vector": vectors[2].tolist()}]
    for flt, keep in ((None, lambda r: True),
                      ({"label": ["3", "5"]}, lambda r: r["label"] in ("3", "5"))):
        body = {"queries": queries, "k": 6, **({"filter": flt} if flt else {})}
        answer = client.post(f"/v1/embeddings/{flow['set_id']}/search/batch", json=body)
        assert answer.status_code == 200, answer.text
        answers = answer.json()["answers"]
        assert len(answers) == len(queries)
        for query, got in zip(queries, answers, strict=True):
            if "key" in query:
                own = by_key[query["key"]]
                assert got["query"] == {"key": own["key"], "index": own["index"],
                                        "label": own["label"]}
                keys, _ = brute_force(exported, np.asarray(own["mu"]), 6,
                                      keep=lambda r, o=own, f=keep: f(r) and r["key"] != o["key"])
            else:
                assert got["query"] is None
                keys, _ = brute_force(exported, np.asarray(query["vector"]), 6, keep=keep)
            assert [h["key"] for h in got["results"]] == keys


def test_batch_search_names_what_is_wrong(client, flow):
    url = f"/v1/embeddings/{flow['set_id']}/search/batch"
    missing = client.post(url, json={"queries": [{"key": "d0001"}, {"key": "no-such-key"}]})
    assert missing.status_code == 404 and "'no-such-key'" in missing.text
    both = client.post(url, json={"queries": [{"key": "d0001"},
                                              {"key": "d0002", "vector": [0, 0, 0, 0]}]})
    assert both.status_code == 422 and "query 1" in both.text
    short = client.post(url, json={"queries": [{"vector": [0, 0, 0, 0]}, {"vector": [0, 0]}]})
    assert short.status_code == 422 and "query 1: vector must have 4 values" in short.text
    assert client.post(url, json={"queries": []}).status_code == 422


def test_outliers_are_the_lowest_log_px(client, flow, exported):
    answer = client.get(f"/v1/embeddings/{flow['set_id']}/outliers", params={"k": 5}).json()
    assert answer["ranked_by"] == "log_px"
    expected = [r["key"] for r in sorted(exported, key=lambda r: (r["log_px"], r["index"]))[:5]]
    assert [h["key"] for h in answer["results"]] == expected


def test_plots_are_pngs(client, flow):
    for path in (f"/v1/models/{flow['model_id']}/plots/curves.png",
                 f"/v1/embeddings/{flow['set_id']}/plots/latent.png"):
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(answer.content)).size[0] > 300


def test_dataset_pages_and_thumbnails_are_the_stored_items(client, flow, digits):
    images, labels = digits
    ds = flow["dataset"]["id"]
    page = client.get(f"/v1/datasets/{ds}/items", params={"offset": 1790, "limit": 50}).json()
    assert page["n"] == 7 and page["item_shape"] == [1, 8, 8]  # clipped at the end
    np.testing.assert_array_equal(np.asarray(page["x"], np.float32), images[1790:])
    assert page["keys"] == list(flow["keys"][1790:])
    assert page["labels"] == [str(v) for v in labels[1790:]]
    answer = client.get(f"/v1/datasets/{ds}/thumbnails.png",
                        params={"offset": 10, "n": 4, "columns": 2})
    assert answer.headers["content-type"] == "image/png"
    grid = np.asarray(Image.open(io.BytesIO(answer.content)).convert("L"), np.float64)
    assert grid.shape == ((2 * 9 + 1) * 4, (2 * 9 + 1) * 4)  # 2 x 2 items, borders, 4x
    for i in range(4):  # item 10 + i at row i // 2, column i % 2, values / max (1.0 here)
        r, c = divmod(i, 2)
        cell = grid[4 + 36 * r: 36 + 36 * r: 4, 4 + 36 * c: 36 + 36 * c: 4]
        np.testing.assert_allclose(cell / 255, images[10 + i, 0], atol=1 / 255 + 1e-6)
    for params, status in (({"offset": 1797}, 422), ({"limit": 0}, 422),
                           ({"limit": 257}, 422)):
        answer = client.get(f"/v1/datasets/{ds}/items", params=params)
        assert answer.status_code == status, (params, answer.text)
    assert client.get("/v1/datasets/999999/items").status_code == 404


def test_projection_is_the_pca_of_the_stored_codes(client, flow, exported):
    got = client.get(f"/v1/embeddings/{flow['set_id']}/projection", params={"n": 600}).json()
    step = -(-len(exported) // 600)  # every 3rd item of 1797
    sample = exported[::step][:600]
    assert got["keys"] == [r["key"] for r in sample] and got["n_items"] == len(exported)
    mu = np.asarray([r["mu"] for r in sample], np.float64)
    centred = mu - mu.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:2].T
    points = np.asarray(got["points"])
    signs = np.sign((points * want).sum(0))  # an axis' sign is arbitrary
    np.testing.assert_allclose(points * signs, want, atol=1e-5)
    np.testing.assert_allclose(got["explained_variance"], (s ** 2 / (s ** 2).sum())[:2],
                               rtol=1e-6)
    assert got["log_px"] == [r["log_px"] for r in sample]


def test_whoami_names_the_scopes_of_the_key(api, keys):
    for scope, want in (("read", ["read"]), ("write", ["read", "write"]),
                        ("admin", ["read", "write", "admin"])):
        answer = httpx.get(f"{api.url}/v1/whoami",
                           headers={"Authorization": f"Bearer {keys[scope]}"}).json()
        assert answer["scopes"] == want
    assert httpx.get(f"{api.url}/v1/whoami").status_code == 401


def test_the_ui_is_served_offline_with_a_strict_policy(api):
    root = httpx.get(f"{api.url}/")
    assert root.status_code == 307 and root.headers["location"] == "/ui/"
    page = httpx.get(f"{api.url}/ui/")
    assert page.status_code == 200 and "latentbank" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    # every asset the page names is served here: no CDN
    for asset in ("app.js", "app.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css",
                  "vendor/LICENSE-uPlot.txt"):
        assert f'{asset}"' in page.text or asset.startswith("vendor/LICENSE")
        assert httpx.get(f"{api.url}/ui/{asset}").status_code == 200, asset
    assert "http" not in page.text.replace('href="/docs"', "")


def test_metrics_count_requests_jobs_and_decode_batches(anonymous, flow, client):
    client.post(f"/v1/models/{flow['model_id']}/decode", json={"z": [[0, 0, 0, 0]]})
    text = anonymous.get("/metrics").text
    assert 'latentbank_http_request_duration_seconds_count{method="POST",' \
           'route="/v1/models/{model_id}/decode",status="200"}' in text
    assert 'latentbank_jobs{kind="train",status="succeeded"}' in text
    count = [line for line in text.splitlines()
             if line.startswith("latentbank_decode_batch_rows_count")]
    assert count and float(count[0].split()[-1]) >= 1


def test_listing_and_idempotent_submission(client, flow):
    assert any(d["id"] == flow["dataset"]["id"] for d in client.get("/v1/datasets").json())
    assert any(m["id"] == flow["model_id"] for m in client.get("/v1/models").json())
    assert any(e["id"] == flow["set_id"] for e in client.get("/v1/embeddings").json())
    body = {"model_id": flow["model_id"], "dataset_id": flow["dataset"]["id"]}
    first = client.post("/v1/embedding-jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = client.post("/v1/embedding-jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    # The key is bound to its request: another body under it is refused, naming the key.
    other = client.post("/v1/embedding-jobs", json={**body, "importance_samples": 5},
                        headers={"Idempotency-Key": "k-1"})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert "'k-1'" in other.json()["error"]["message"]


def test_fifty_concurrent_submissions_with_one_key_create_one_job(client, flow):
    from concurrent.futures import ThreadPoolExecutor

    body = {"model_id": flow["model_id"], "dataset_id": flow["dataset"]["id"]}
    before = len(client.get("/v1/jobs", params={"kind": "embed", "limit": 1000}).json())

    def submit(_):
        with httpx.Client(base_url=client.base_url, headers=client.headers) as own:
            return own.post("/v1/embedding-jobs", json=body,
                            headers={"Idempotency-Key": "fifty-at-once"})

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(submit, range(50)))
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["id"] for a in answers}) == 1
    after = client.get("/v1/jobs", params={"kind": "embed", "limit": 1000}).json()
    assert len(after) == before + 1
    client.post(f"/v1/jobs/{answers[0].json()['id']}/cancel")


def upload(client, name, images, labels, keys):
    answer = client.post("/v1/datasets", data={"name": name}, files={
        "file": (f"{name}.npy", npy(images), "application/octet-stream"),
        "labels": ("labels.npy", npy(labels)), "keys": ("keys.npy", npy(keys))})
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["id"]


def export_rows(client, set_id):
    with client.stream("GET", f"/v1/embeddings/{set_id}/export") as response:
        return [json.loads(line) for line in response.iter_lines() if line]


def test_an_embedding_set_grows_by_appending_a_dataset(client, flow, digits, onnx_files):
    images, labels = digits
    first = upload(client, "grow-a", images[:1000], labels[:1000],
                   np.array([f"a{i:04d}" for i in range(1000)]))
    second = upload(client, "grow-b", images[1000:], labels[1000:],
                    np.array([f"b{i:04d}" for i in range(1000, len(images))]))
    clashing = upload(client, "grow-c", images[:3], labels[:3], np.array(["c0", "a0005", "c2"]))
    model = flow["model_id"]
    job = wait_job(client, client.post("/v1/embedding-jobs", json={
        "model_id": model, "dataset_id": first, "importance_samples": 10}).json()["id"])
    set_id = job["embedding_set_id"]
    assert job["status"] == "succeeded"

    answer = client.post("/v1/embedding-jobs", json={
        "model_id": model, "dataset_id": second, "embedding_set_id": set_id})
    assert answer.status_code == 202, answer.text
    appended = wait_job(client, answer.json()["id"])
    assert appended["status"] == "succeeded", appended
    assert appended["embedding_set_id"] == set_id
    assert appended["items_done"] == appended["items_total"] == len(images) - 1000
    es = client.get(f"/v1/embeddings/{set_id}").json()
    assert es["status"] == "ready" and es["n_items"] == len(images)

    rows = export_rows(client, set_id)
    assert [r["key"] for r in rows] == [f"a{i:04d}" for i in range(1000)] + [
        f"b{i:04d}" for i in range(1000, len(images))]
    assert [r["index"] for r in rows] == list(range(len(images)))
    mu = onnx_files["encoder"].run(["mu"], {"x": images})[0]  # the appended codes too
    np.testing.assert_allclose([r["mu"] for r in rows], mu, atol=1e-4)
    assert all(r["log_px"] is not None for r in rows)  # the set's K = 10 carried over
    assert es["stats"]["n_items"] == len(images)
    assert es["stats"]["mean_elbo"] == pytest.approx(np.mean([r["elbo"] for r in rows]))
    item = client.get(f"/v1/embeddings/{set_id}/items/b1500").json()
    assert item["index"] == 1500 and item["label"] == str(labels[1500])
    found = client.post(f"/v1/embeddings/{set_id}/search",
                        json={"key": "a0007", "k": 10, "exact": True}).json()["results"]
    want = brute_force(rows, np.asarray(rows[7]["mu"]), 10, keep=lambda r: r["key"] != "a0007")
    assert [h["key"] for h in found] == want[0]
    assert any(key.startswith("b") for key in want[0])  # neighbours from both datasets

    # clashes and misuse are refused before anything is written
    for body, status, words in (
            ({"dataset_id": clashing}, 409, "'a0005'"),
            ({"dataset_id": second}, 409, "in embedding set"),
            ({"dataset_id": clashing, "importance_samples": 3}, 422, "same"),
            ({"dataset_id": clashing, "embedding_set_id": 2**62}, 404, "does not exist")):
        answer = client.post("/v1/embedding-jobs", json={
            "model_id": model, "embedding_set_id": set_id, **body})
        assert answer.status_code == status and words in answer.text, (body, answer.text)
    assert client.get(f"/v1/embeddings/{set_id}").json()["n_items"] == len(images)
    assert len(export_rows(client, set_id)) == len(images)
