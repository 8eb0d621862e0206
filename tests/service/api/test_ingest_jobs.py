"""Registration as an ingest job through the HTTP API, with the session's real worker:
a `uri` answers 202 and the job registers the dataset; a large upload becomes a job, a
small one stays in the request; bad options are refused before anything is queued; a
broken file fails the job with its message and leaves nothing behind."""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import Served, counts, settings_of, wait_job, whole_stack


def npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def ingest_job_ids(client):
    return {j["id"] for j in client.get("/v1/jobs", params={"kind": "ingest",
                                                             "limit": 1000}).json()}


def items_of(client, dataset_id, n):
    page = client.get(f"/v1/datasets/{dataset_id}/items", params={"limit": n}).json()
    return np.asarray(page["x"], np.float32), page["keys"]


@pytest.fixture(scope="module")
def allowed(api_env):
    return Path(api_env["LATENTBANK_ALLOWED_ROOTS"])


@pytest.fixture(scope="module")
def staging(api_env):
    return Path(api_env["LATENTBANK_DATA_DIR"]).resolve() / "staging"


def test_a_uri_answers_202_and_the_job_registers_the_dataset(client, api_worker, allowed,
                                                             staging):
    data = np.random.default_rng(241).normal(size=(37, 2, 3)).astype(np.float64)
    np.save(allowed / "ingest-uri.npy", data)
    r = client.post("/v1/datasets", json={"name": "ingest-uri",
                                          "uri": str(allowed / "ingest-uri.npy")})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["mode"] == "job" and body["dataset"] is None
    # the answer is read after the job was sent: a free worker may have started it
    assert body["job"]["kind"] == "ingest" and body["job"]["status"] in ("queued", "running")
    assert r.headers["location"] == f"/v1/jobs/{body['job']['id']}"
    job = wait_job(client, body["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["items_done"] == 37 and job["progress"] == 1.0
    dataset = client.get(f"/v1/datasets/{job['dataset_id']}").json()
    assert (dataset["name"], dataset["n_items"], dataset["item_shape"]) == (
        "ingest-uri", 37, [2, 3])
    x, keys = items_of(client, dataset["id"], 37)
    np.testing.assert_array_equal(x, data.astype(np.float32))  # numpy's own cast
    assert keys == [str(i) for i in range(37)]
    assert not (staging / f"job-{job['id']}").exists()
    # the same content again: the job succeeds, pointing at the dataset already there
    again = client.post("/v1/datasets", json={"name": "ingest-uri-again",
                                              "uri": str(allowed / "ingest-uri.npy")})
    repeat = wait_job(client, again.json()["job"]["id"])
    assert repeat["status"] == "succeeded" and repeat["dataset_id"] == dataset["id"]
    assert "registered already" in repeat["progress_message"]


def test_a_folder_of_npy_files_is_one_dataset_in_file_order(client, api_worker, allowed,
                                                            staging):
    (staging / "job-987654321" / "unit-000000").mkdir(parents=True)  # a job that is gone
    folder = allowed / "ingest-folder"
    folder.mkdir()
    rng = np.random.default_rng(242)
    parts = {name: rng.uniform(size=(n, 4)).astype(np.float32)
             for name, n in (("b", 3), ("a", 5), ("c", 2))}
    for name, part in parts.items():
        np.save(folder / f"{name}.npy", part)
    r = client.post("/v1/datasets", json={"name": "ingest-folder", "uri": str(folder)})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    x, keys = items_of(client, job["dataset_id"], 10)
    np.testing.assert_array_equal(x, np.concatenate([parts["a"], parts["b"], parts["c"]]))
    assert keys == [f"a/{i}" for i in range(5)] + [f"b/{i}" for i in range(3)] + [
        "c/0", "c/1"]
    assert not (staging / "job-987654321").exists()  # swept by the job's start


@pytest.mark.parametrize(("extra", "status", "needle"), [
    ({"image_size": "big"}, 422, "image_size"),
    ({"image_size": [0, 3]}, 422, "image_size"),
    ({"color": "purple"}, 422, "color"),
    # 3 x 600 x 600 = 1,080,000 values > max_item_values (1,048,576): refused at once
    ({"image_size": 600}, 422, "1080000 values"),
    ({"image_size": "1025x1024", "color": "grey"}, 422, "max_item_values"),
    ({"max_failure_share": 2}, 422, "max_failure_share"),
    ({"format": "docx"}, 422, "format"),
])
def test_bad_options_are_refused_before_anything_is_queued(client, api_worker, allowed,
                                                           extra, status, needle):
    np.save(allowed / "ingest-options.npy", np.ones((2, 2)))
    before = ingest_job_ids(client)
    r = client.post("/v1/datasets", json={"name": "opts",
                                          "uri": str(allowed / "ingest-options.npy"),
                                          **extra})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert ingest_job_ids(client) == before


def test_a_uri_outside_the_roots_or_missing_is_refused_before_queueing(client, allowed,
                                                                       tmp_path):
    before = ingest_job_ids(client)
    np.save(tmp_path / "outside.npy", np.ones((2, 2)))
    r = client.post("/v1/datasets", json={"name": "x", "uri": str(tmp_path / "outside.npy")})
    assert r.status_code == 422 and "outside the allowed roots" in r.json()["error"]["message"]
    r = client.post("/v1/datasets", json={"name": "x", "uri": str(allowed / "nope.npy")})
    assert r.status_code == 404, r.text
    assert ingest_job_ids(client) == before


def test_a_broken_file_fails_the_job_with_its_message_and_leaves_nothing(
        client, api_worker, api_db, allowed, staging):
    (allowed / "ingest-broken.npy").write_bytes(b"\x93NUMPY\x01\x00" + b"garbage" * 20)
    before = counts(api_db)
    r = client.post("/v1/datasets", json={"name": "ingest-broken",
                                          "uri": str(allowed / "ingest-broken.npy")})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "failed" and job["attempts"] == 1, job  # no retry
    assert ".npy" in job["error"] and job["dataset_id"] is None
    assert counts(api_db) == before
    assert not (staging / f"job-{job['id']}").exists()


def test_a_small_upload_stays_in_the_request(client):
    data = np.random.default_rng(243).normal(size=(6, 3)).astype(np.float32)
    r = client.post("/v1/datasets", data={"name": "ingest-small"},
                    files={"file": ("small.npy", npy(data))})
    assert r.status_code == 201, r.text
    assert r.json()["mode"] == "sync" and r.json()["n_items"] == 6


@pytest.fixture(scope="module")
@whole_stack
def small_sync_api(api_env, keys):
    """A second API on the same database, broker and data dir whose uploads above 1 KiB
    become ingest jobs."""
    import httpx

    from service.api.app import create_app

    served = Served(create_app(settings_of(api_env, ingest_sync_max_bytes=1024)))
    with httpx.Client(base_url=served.url, timeout=60,
                      headers={"Authorization": f"Bearer {keys['write']}"}) as c:
        yield c
    served.stop()


def test_a_large_upload_becomes_a_job_and_its_saved_file_goes(small_sync_api, api_worker,
                                                               api_env):
    data = np.random.default_rng(244).integers(0, 9, size=(300, 2)).astype(np.int32)
    labels = np.arange(300) % 3
    r = small_sync_api.post(
        "/v1/datasets", data={"name": "ingest-large"},
        files={"file": ("labels.npy", npy(data)), "labels": ("l.npy", npy(labels))},
        headers={"Idempotency-Key": "ingest-large-1"})  # a data file named as a part
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["mode"] == "job" and "upload_key" not in body["job"]["params"]
    assert body["job"]["params"]["filename"] == "labels.npy"
    replay = small_sync_api.post(
        "/v1/datasets", data={"name": "ingest-large"},
        files={"file": ("labels.npy", npy(data)), "labels": ("l.npy", npy(labels))},
        headers={"Idempotency-Key": "ingest-large-1"})
    assert replay.status_code == 202 and replay.json()["job"]["id"] == body["job"]["id"]
    assert replay.headers["idempotent-replayed"] == "true"
    job = wait_job(small_sync_api, body["job"]["id"])
    assert job["status"] == "succeeded", job
    page = small_sync_api.get(f"/v1/datasets/{job['dataset_id']}/items",
                              params={"limit": 256, "offset": 44}).json()
    np.testing.assert_array_equal(np.asarray(page["x"]), data[44:300].astype(np.float32))
    assert page["labels"] == [str(v) for v in labels[44:300]]
    # the saved parts went: from the API's disk at once, from the artifact store with the job
    assert not os.listdir(Path(api_env["LATENTBANK_DATA_DIR"]).resolve() / "uploads")
    stored = Path(api_env["LATENTBANK_ARTIFACTS"].removeprefix("file://")) / "uploads"
    assert (stored.parent / "datasets").is_dir()  # the store's root indeed
    assert not stored.exists() or not os.listdir(stored)


def write_images(folder, seed, classes=("cat", "dog"), per_class=3):
    """PNG files of random RGB pixels under class folders; their pixels by key."""
    rng = np.random.default_rng(seed)
    expected = {}
    for cls in classes:
        (folder / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / cls / f"{i}.png")
            expected[f"{cls}/{i}.png"] = pixels
    return expected


def test_a_folder_of_images_becomes_8bit_items_through_a_job(client, api_worker, allowed):
    folder = allowed / "ingest-images"
    expected = write_images(folder, 245)
    (folder / "README.txt").write_text("not an image: skipped")
    r = client.post("/v1/datasets", json={"name": "ingest-images", "uri": str(folder),
                                          "color": "rgb"})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    ds = client.get(f"/v1/datasets/{job['dataset_id']}").json()
    assert (ds["dtype"], ds["item_shape"], ds["n_items"], ds["has_labels"]) == (
        "uint8", [3, 6, 5], 6, True)
    page = client.get(f"/v1/datasets/{ds['id']}/items", params={"limit": 6}).json()
    assert page["keys"] == sorted(expected)
    assert page["labels"] == [k.split("/")[0] for k in sorted(expected)]
    for key, x in zip(page["keys"], page["x"], strict=True):  # values are x / 255
        decoded = np.asarray(Image.open(folder / key).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(np.rint(np.asarray(x) * 255), decoded)
        np.testing.assert_array_equal(decoded, expected[key].transpose(2, 0, 1))


def test_too_many_unreadable_images_fail_the_job_with_the_report(client, api_worker, api_db,
                                                                allowed, staging):
    folder = allowed / "ingest-corrupt"
    write_images(folder, 246, classes=("a",), per_class=4)
    (folder / "a" / "bad-1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (folder / "a" / "bad-2.jpg").write_bytes(b"plain text")
    before = counts(api_db)
    r = client.post("/v1/datasets", json={"name": "ingest-corrupt", "uri": str(folder)})
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert "2 of 6 items could not be read" in job["error"]  # 2 / 6 > the default 5 %
    assert "a/bad-1.png" in job["error"] and "a/bad-2.jpg" in job["error"]
    assert counts(api_db) == before
    assert not (staging / f"job-{job['id']}").exists()
    # allowed a third of failures, the same folder registers its 4 readable images
    r = client.post("/v1/datasets", json={"name": "ingest-corrupt", "uri": str(folder),
                                          "max_failure_share": 0.34})
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    assert "2 unreadable items skipped" in job["progress_message"]
    page = client.get(f"/v1/datasets/{job['dataset_id']}/items").json()
    assert page["keys"] == [f"a/{i}.png" for i in range(4)]
    # the dataset keeps its report: both failures named with a reason, counts exact
    record = client.get(f"/v1/datasets/{job['dataset_id']}").json()["ingest"]
    assert (record["report"]["read"], record["report"]["failed"]) == (4, 2)
    named = {f["key"]: f["reason"] for f in record["report"]["failures"]}
    assert set(named) == {"a/bad-1.png", "a/bad-2.jpg"} and all(named.values())
    assert record["format"] == "images" and record["image"]["color"] == "rgb"


def test_an_uploaded_zip_and_image_parquet_are_jobs_with_the_same_pixels(client, api_worker,
                                                                         tmp_path):
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    expected = write_images(tmp_path / "src", 247, classes=("x", "y"), per_class=2)
    archive = tmp_path / "src.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for key in sorted(expected):
            zf.write(tmp_path / "src" / key, key)
    table = pa.table({
        "image": [{"bytes": (tmp_path / "src" / k).read_bytes(), "path": k}
                  for k in sorted(expected)],
        "label": [k.split("/")[0] for k in sorted(expected)]})
    pq.write_table(table, tmp_path / "src.parquet")
    answers = [
        client.post("/v1/datasets", data={"name": "ingest-zip"},
                    files={"file": ("src.zip", archive.read_bytes())}),
        client.post("/v1/datasets", data={"name": "ingest-image-parquet",
                                          "label_column": "label"},
                    files={"file": ("src.parquet", (tmp_path / "src.parquet").read_bytes())})]
    for r in answers:
        assert r.status_code == 202 and r.json()["mode"] == "job", r.text
        job = wait_job(client, r.json()["job"]["id"])
        assert job["status"] == "succeeded", job
        page = client.get(f"/v1/datasets/{job['dataset_id']}/items").json()
        assert page["keys"] == sorted(expected)
        assert page["labels"] == ["x", "x", "y", "y"]
        for key, x in zip(page["keys"], page["x"], strict=True):
            np.testing.assert_array_equal(np.rint(np.asarray(x) * 255),
                                          expected[key].transpose(2, 0, 1))


def test_an_uploaded_tar_gz_and_idx_files_by_uri_are_jobs_with_their_own_pixels(
        client, api_worker, allowed, tmp_path):
    """The remaining containers through the HTTP API: a .tar.gz of class folders (upload)
    and an MNIST-style IDX pair, gzipped, named by uri (the labels found beside the
    images by name); IDX files are written here byte by byte from the format's spec."""
    import gzip
    import struct
    import tarfile

    expected = write_images(tmp_path / "src", 248, classes=("p", "q"), per_class=3)
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for key in sorted(expected):
            tar.add(tmp_path / "src" / key, arcname=f"src/{key}")
    r = client.post("/v1/datasets", data={"name": "ingest-targz"},
                    files={"file": ("src.tar.gz", archive.read_bytes())})
    assert r.status_code == 202 and r.json()["mode"] == "job", r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    page = client.get(f"/v1/datasets/{job['dataset_id']}/items").json()
    assert page["keys"] == sorted(expected)  # the archive's top folder is not in the keys
    assert page["labels"] == [k.split("/")[0] for k in sorted(expected)]
    for key, x in zip(page["keys"], page["x"], strict=True):
        np.testing.assert_array_equal(np.rint(np.asarray(x) * 255),
                                      expected[key].transpose(2, 0, 1))

    pixels = np.random.default_rng(248).integers(0, 256, size=(7, 5, 4), dtype=np.uint8)
    digits = np.asarray([3, 1, 4, 1, 5, 9, 2], np.uint8)
    folder = allowed / "ingest-idx"
    folder.mkdir()
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, 7, 5, 4) + pixels.tobytes())
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 0x801, 7) + digits.tobytes())
    r = client.post("/v1/datasets", json={
        "name": "ingest-idx", "uri": str(folder / "t10k-images-idx3-ubyte.gz")})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    ds = client.get(f"/v1/datasets/{job['dataset_id']}").json()
    assert (ds["dtype"], ds["item_shape"], ds["source_format"]) == ("uint8", [1, 5, 4], "idx")
    page = client.get(f"/v1/datasets/{ds['id']}/items", params={"limit": 7}).json()
    assert page["keys"] == [str(i) for i in range(7)]
    assert page["labels"] == [str(d) for d in digits]
    np.testing.assert_array_equal(np.rint(np.asarray(page["x"]) * 255), pixels[:, None])
