"""Issue 24's "done when", as a user types it against `latentbank up`: a folder of class
sub-folders of JPEGs added with `datasets add ./photos/`, a conv VAE with the discretised
logistic trained on it, embedded, and searched with `search SET --image query.jpg`, whose
nearest neighbour is the photo itself; and the same photos as WebDataset shards by a
brace-pattern `--uri` through the API's job path give the same pixels; and the same chain
through the HTTP API for a `.zip` upload, WebDataset shards by `uri` and an uploaded
image-column parquet.

Every figure is checked independently: the stored items against Pillow's own decode of the
files (the centre box resized, done here with Pillow), the neighbours against a NumPy brute
force over the exported latents."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from tests.support import cli, cli_json

pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

SIDE = 16  # stored items are 3 x 16 x 16 (the photos are larger and not square)
CLASSES = {"cat": (220, 60, 40), "dog": (40, 160, 60), "owl": (50, 70, 210)}


def photo(label, i):
    """A JPEG of 40 x 28 px: a class-coloured disc on a light ground, moved by i."""
    rng = np.random.default_rng(i)
    image = Image.new("RGB", (40, 28), tuple(int(v) for v in rng.integers(180, 256, 3)))
    x, y = 6 + i % 12, 4 + (i * 5) % 8
    ImageDraw.Draw(image).ellipse((x, y, x + 14, y + 14), fill=CLASSES[label])
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def expected(data):
    """What the service must store for these bytes: Pillow's decode, its centred square
    (the target's aspect ratio, fractional edges) resized to SIDE x SIDE (bilinear),
    channels first. The photos are small enough that no JPEG draft scale applies."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    image = image.resize((SIDE, SIDE), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "photos"
    files = {}
    for label in CLASSES:
        (root / label).mkdir(parents=True)
        for i in range(20):
            data = photo(label, i)
            (root / label / f"{i:03d}.jpg").write_bytes(data)
            files[f"{label}/{i:03d}.jpg"] = data
    return root, files


@pytest.fixture(scope="module")
def added(stack, photos):
    root, _ = photos
    out = cli(stack.data_dir, "datasets", "add", root, "--image-size", SIDE, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stored_items(stack, dataset):
    import httpx

    with httpx.Client(base_url=stack.url, timeout=60,
                      headers={"Authorization": f"Bearer {stack.key}"}) as client:
        page = client.get(f"/v1/datasets/{dataset['id']}/items",
                          params={"limit": dataset["n_items"]}).json()
    return dict(zip(page["keys"], page["labels"], strict=True)), {
        k: np.asarray(x) for k, x in zip(page["keys"], page["x"], strict=True)}


def test_a_folder_of_jpegs_becomes_uint8_items_with_labels_from_folders(stack, photos, added):
    _, files = photos
    assert added["n_items"] == len(files)
    assert added["item_shape"] == [3, SIDE, SIDE] and added["dtype"] == "uint8"
    labels, values = stored_items(stack, added)
    assert labels == {key: key.split("/")[0] for key in files}
    for key, data in files.items():  # the items route answers x / 255
        np.testing.assert_array_equal(np.rint(values[key] * 255).astype(np.uint8),
                                      expected(data))


def test_webdataset_shards_by_uri_through_the_job_path_give_the_same_pixels(stack, photos):
    _, files = photos
    keys = sorted(files)
    for shard in range(3):
        with tarfile.open(stack.allowed / f"shard-{shard:06d}.tar", "w") as tar:
            for j, key in enumerate(keys[shard::3]):
                sample = f"{shard}{j:04d}"
                for name, payload in ((f"{sample}.jpg", files[key]),
                                      (f"{sample}.cls", key.split("/")[0].encode()),
                                      (f"{sample}.json", json.dumps({"file": key}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    dataset = cli_json(stack.data_dir, "datasets", "add", "--uri",
                       f"{stack.allowed}/shard-{{000000..000002}}.tar", "--image-size", SIDE,
                       "--name", "photo-shards")
    assert dataset["n_items"] == len(files) and dataset["source_format"] == "webdataset"
    labels, values = stored_items(stack, dataset)
    for shard in range(3):
        for j, key in enumerate(keys[shard::3]):
            sample = f"{shard}{j:04d}"
            assert labels[sample] == key.split("/")[0]
            np.testing.assert_array_equal(np.rint(values[sample] * 255).astype(np.uint8),
                                          expected(files[key]))


@pytest.fixture(scope="module")
def trained(stack, added):
    """A conv VAE with the discretised logistic, trained on the folder's photos by the CLI."""
    train = cli(stack.data_dir, "train", "--dataset", added["id"], "--family", "conv",
                "--hidden", "16,32", "--blocks", "1", "--norm", "group", "--latent-dim", "8",
                "--likelihood",
                "discretized_logistic", "--epochs", "3", "--importance-samples", "10",
                "--watch", "--json")
    assert train.returncode == 0, train.stderr
    model_id = json.loads(train.stdout.splitlines()[-1])["model_id"]
    model = cli_json(stack.data_dir, "models", "show", model_id)
    assert model["config"]["model"]["likelihood"] == "discretized_logistic"
    assert model["config"]["model"]["blocks"] == 1
    return model_id


def test_train_embed_and_search_by_image_finds_the_photo_itself(stack, photos, added,
                                                                trained, tmp_path):
    _, files = photos
    model_id = trained
    embed = cli(stack.data_dir, "embed", "--model", model_id, "--dataset", added["id"],
                "--watch", "--json")
    assert embed.returncode == 0, embed.stderr
    set_id = json.loads(embed.stdout.splitlines()[-1])["embedding_set_id"]
    export = tmp_path / "set.parquet"
    assert cli(stack.data_dir, "export", set_id, "-o", export).returncode == 0
    rows = {r["key"]: np.asarray(r["mu"], dtype=np.float64)
            for r in pq.read_table(export).to_pylist()}
    for key in ("cat/004.jpg", "owl/017.jpg"):
        query = tmp_path / "query.jpg"
        query.write_bytes(files[key])
        out = cli_json(stack.data_dir, "search", set_id, "--image", query, "-k", 5,
                       "--exact")
        hits = out["results"]
        assert hits[0]["key"] == key and hits[0]["distance"] == pytest.approx(0, abs=1e-4)
        brute = sorted(rows, key=lambda k: np.linalg.norm(rows[k] - rows[key]))[:5]
        assert [h["key"] for h in hits] == brute


def test_the_same_chain_through_the_api_for_a_zip_shards_and_an_image_parquet(
        stack, photos, trained, tmp_path):
    """The photos as a `.zip` upload, WebDataset shards named by `uri` and an uploaded
    parquet with an image column: each an ingest job, embedded with the model trained on
    the folder, and searched with an uploaded JPEG through the API. The pixels are the
    folder's (checked above for the folder and the shards), so each set's exact neighbours
    must be the folder-trained model's neighbours of that photo: the key of the photo
    itself at distance 0, then the same distances as a NumPy brute force over the set's
    exported latents."""
    import zipfile

    import httpx
    import pyarrow as pa

    from tests.support import wait_job

    _, files = photos
    keys = sorted(files)
    # each container leaves out a different photo: the same items would be recognised by
    # their checksum as the folder's dataset (registration returns the first one)
    held = {"zip": [k for k in keys if k != "cat/000.jpg"],
            "image-parquet": [k for k in keys if k != "cat/001.jpg"], "webdataset": keys}
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for key in held["zip"]:
            zf.writestr(key, files[key])
    table = tmp_path / "photos.parquet"
    pq.write_table(pa.table({"image": [{"bytes": files[k], "path": k}
                                       for k in held["image-parquet"]],
                             "label": [k.split("/")[0] for k in held["image-parquet"]]}),
                   table)
    sample_of = {}  # WebDataset sample id -> the photo's key
    with tarfile.open(stack.allowed / "api-shard-000000.tar", "w") as first, \
            tarfile.open(stack.allowed / "api-shard-000001.tar", "w") as second:
        for j, key in enumerate(keys):
            sample_of[f"s{j:04d}"] = key
            for name, payload in ((f"s{j:04d}.jpg", files[key]),
                                  (f"s{j:04d}.cls", key.split("/")[0].encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                (first if j % 2 else second).addfile(info, io.BytesIO(payload))

    with httpx.Client(base_url=stack.url, timeout=120,
                      headers={"Authorization": f"Bearer {stack.key}"}) as client:
        answers = {
            "zip": client.post("/v1/datasets", data={"name": "api-zip", "image_size": SIDE},
                               files={"file": ("photos.zip", archive.read_bytes())}),
            "webdataset": client.post("/v1/datasets", json={
                "name": "api-shards", "image_size": SIDE,
                "uri": f"{stack.allowed}/api-shard-{{000000..000001}}.tar"}),
            "image-parquet": client.post(
                "/v1/datasets", data={"name": "api-image-parquet", "image_size": SIDE,
                                      "label_column": "label"},
                files={"file": ("photos.parquet", table.read_bytes())})}
        for source, answer in answers.items():
            assert answer.status_code == 202, (source, answer.text)
            job = wait_job(client, answer.json()["job"]["id"])
            assert job["status"] == "succeeded", (source, job)
            dataset = client.get(f"/v1/datasets/{job['dataset_id']}").json()
            assert dataset["n_items"] == len(held[source]), source
            assert dataset["dtype"] == "uint8" and dataset["source_format"] == source
            embedding = client.post("/v1/embedding-jobs", json={
                "model_id": trained, "dataset_id": dataset["id"]})
            assert embedding.status_code == 202, (source, embedding.text)
            done = wait_job(client, embedding.json()["id"])
            assert done["status"] == "succeeded", (source, done)
            set_id = done["embedding_set_id"]
            export = tmp_path / f"{source}.parquet"
            export.write_bytes(client.get(f"/v1/embeddings/{set_id}/export",
                                          params={"format": "parquet"}).content)
            mu = {(sample_of.get(r["key"], r["key"])): np.asarray(r["mu"], dtype=np.float64)
                  for r in pq.read_table(export).to_pylist()}
            assert sorted(mu) == held[source], source
            for key in ("dog/009.jpg", "owl/013.jpg"):
                hits = client.post(f"/v1/embeddings/{set_id}/search",
                                   data={"k": "5", "exact": "true"},
                                   files={"image": ("query.jpg", files[key], "image/jpeg")})
                assert hits.status_code == 200, (source, hits.text)
                results = hits.json()["results"]
                assert sample_of.get(results[0]["key"], results[0]["key"]) == key, source
                assert results[0]["distance"] == pytest.approx(0, abs=1e-4)
                brute = sorted(np.linalg.norm(v - mu[key]) for v in mu.values())[:5]
                np.testing.assert_allclose([h["distance"] for h in results], brute,
                                           rtol=1e-4, atol=1e-4)
        # /encode and /score take the JPEG too: its code is the one the worker stored
        jpeg = {"image": ("query.jpg", files["dog/009.jpg"], "image/jpeg")}
        code = client.post(f"/v1/models/{trained}/encode", files=jpeg)
        assert code.status_code == 200, code.text
        np.testing.assert_allclose(code.json()["mu"][0], mu["dog/009.jpg"], atol=1e-5)
        score = client.post(f"/v1/models/{trained}/score", data={"fpr": "0.05"}, files=jpeg)
        assert score.status_code == 200, score.text
        assert np.isfinite(score.json()["elbo"][0]) and len(score.json()["is_outlier"]) == 1
