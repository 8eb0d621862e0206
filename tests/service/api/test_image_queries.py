"""Search, encode and score by image, end to end: an RGB dataset registered from generated
images (Pillow), an (untrained) model over 3x8x8 items, an embedding set the worker
embeds, then queries made of PNG files of its own items.

Every figure is checked against an independent computation: neighbours against a brute
force numpy search over the set's exported latents, codes against onnxruntime run on the
downloaded encoder, image queries against the same item sent as JSON values, pixels against
Pillow and numpy."""

import io
import json
import struct
import time
import zlib

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image, ImageDraw

from tests.support import cli, store_untrained_model, wait, wait_job

N, SHAPE = 24, (3, 8, 8)
MODEL = {"input_shape": list(SHAPE), "latent_dim": 4, "hidden": [32],
         "likelihood": "gaussian"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


def generated_pixels(n, seed=5):
    """n RGB 8x8 images drawn with Pillow: a coloured square per class on noise (so no two
    items are alike), as uint8 (n, 3, 8, 8), with their labels."""
    rng = np.random.default_rng(seed)
    pixels, labels = [], []
    for i in range(n):
        label = list(COLOURS)[i % len(COLOURS)]
        image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB")
        corner = int(rng.integers(0, 4))
        ImageDraw.Draw(image).rectangle((corner, corner, corner + 3, corner + 3),
                                        fill=COLOURS[label])
        pixels.append(np.asarray(image).transpose(2, 0, 1))
        labels.append(label)
    return np.stack(pixels), labels


def png(chw):
    """One uint8 (C, H, W) item as PNG bytes (lossless: it decodes to the same pixels)."""
    buffer = io.BytesIO()
    image = Image.fromarray(chw.transpose(1, 2, 0) if chw.shape[0] == 3 else chw[0])
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def register_images(db, settings, name, pixels, labels, uint8_storage=False):
    """A dataset as a registration from images leaves it: its image transform in
    `datasets.ingest`, its items the pixels' values x / 255. With `uint8_storage`, its
    canonical file is rewritten as the uint8 pixels (the 8-bit storage of image datasets)."""
    from models.transforms import item_values
    from store.datasets import Chunk, Source, get_dataset, register_dataset
    from store.settings import open_artifacts
    from store.tables import Dataset

    artifacts = open_artifacts(settings)
    keys = [f"img/{labels[i]}/{i:03d}.png" for i in range(len(pixels))]
    source = Source(format="png", item_shape=tuple(pixels.shape[1:]), dtype="uint8",
                    n_items=len(pixels), has_keys=True, has_labels=True,
                    chunks=iter([Chunk(item_values(pixels), keys, list(labels))]))
    ds = register_dataset(db, artifacts, settings, name, source,
                          ingest={"image": {"color": "rgb", "size": None},
                                  "format": "folder"}).dataset
    if uint8_storage:
        np.save(artifacts.local_path(ds.artifact_key), pixels, allow_pickle=False)
        with db.session() as s:
            s.get(Dataset, ds.id).dtype = "uint8"
        ds = get_dataset(db, ds.id)
    return ds, keys


@pytest.fixture(scope="module")
def world(client, api_db, api_settings, api_worker, tmp_path_factory):
    from models.evaluate import QUANTILE_LEVELS
    from store.tables import Model

    pixels, labels = generated_pixels(N)
    ds, keys = register_images(api_db, api_settings, f"rgb-{time.monotonic_ns()}", pixels,
                               labels)
    model_id, _ = store_untrained_model(api_db, api_settings,
                                        str(tmp_path_factory.mktemp("rgb-model")), MODEL)
    arrays_model, _ = store_untrained_model(api_db, api_settings,
                                            str(tmp_path_factory.mktemp("arrays-model")),
                                            MODEL)
    with api_db.session() as s:  # the model of the image dataset, with held-out figures
        row = s.get(Model, model_id)
        row.dataset_id = ds.id
        # held-out ELBOs spread evenly over [-200, -100]: the threshold at f is -200 + 200 f
        row.summary = {"heldout_split": "val", "heldout_quantiles": {
            "statistic": "elbo", "importance_samples": 0, "n_items": 1001,
            "levels": QUANTILE_LEVELS.tolist(),
            "values": (-200.0 + 200.0 * QUANTILE_LEVELS).tolist()}}
    answer = client.post("/v1/embedding-jobs", json={"model_id": model_id,
                                                     "dataset_id": ds.id})
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    set_id = job["embedding_set_id"]
    rows = [json.loads(line) for line in
            client.get(f"/v1/embeddings/{set_id}/export").text.splitlines()]
    latents = {r["key"]: np.asarray(r["mu"], dtype=np.float64) for r in rows}
    encoder = ort.InferenceSession(client.get(f"/v1/models/{model_id}/onnx/encoder").content,
                                   providers=["CPUExecutionProvider"])
    return {"pixels": pixels, "labels": labels, "keys": keys, "dataset": ds,
            "model": model_id, "arrays_model": arrays_model, "set": set_id,
            "latents": latents, "encoder": encoder}


def values(pixels):
    """8-bit items' values as the convention defines them (models/transforms.py): float32
    x times float32 1/255 (within an ulp of x / 255)."""
    return pixels.astype(np.float32) * np.float32(1 / 255)


def encoded(world, i):
    """Item i's posterior mean, onnxruntime on the encoder with x / 255 computed here."""
    x = (world["pixels"][i:i + 1].astype(np.float64) / 255).astype(np.float32)
    return world["encoder"].run(None, {world["encoder"].get_inputs()[0].name: x})


def brute_force(world, query, k, label=None):
    """The k nearest stored latents to `query` by L2, by numpy over every exported row."""
    keys = [key for key in world["latents"]
            if label is None or world["labels"][world["keys"].index(key)] == label]
    distances = np.asarray([np.linalg.norm(world["latents"][key] - query) for key in keys])
    order = np.argsort(distances, kind="stable")[:k]
    return [keys[j] for j in order], distances[order]


def search_multipart(client, world, data, **fields):
    return client.post(f"/v1/embeddings/{world['set']}/search", data=fields,
                       files={"image": ("query.png", data, "image/png")})


def search_raw(client, world, data, kind="image/png", **params):
    return client.post(f"/v1/embeddings/{world['set']}/search", content=data, params=params,
                       headers={"Content-Type": kind})


@pytest.mark.parametrize("i", [0, 7, 23])
def test_an_items_own_picture_finds_itself_first_by_either_form(client, world, i):
    query = encoded(world, i)[0][0].astype(np.float64)
    # the stored code is the encoder's on the same values: the worker embedded these items
    np.testing.assert_allclose(world["latents"][world["keys"][i]], query, atol=1e-5)
    want_keys, want_distances = brute_force(world, query, 5)
    assert want_keys[0] == world["keys"][i]
    answers = [search_multipart(client, world, png(world["pixels"][i]), k="5", exact="true"),
               search_raw(client, world, png(world["pixels"][i]), k=5, exact="true")]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        hits = answer.json()["results"]
        assert [h["key"] for h in hits] == want_keys
        assert hits[0]["distance"] < 1e-4
        np.testing.assert_allclose([h["distance"] for h in hits], want_distances,
                                   rtol=1e-4, atol=1e-4)
        assert hits[0]["label"] == world["labels"][i]
    assert answers[0].json() == answers[1].json()


def test_an_image_search_takes_a_filter_and_a_metric(client, world):
    i, label = 4, "blue"
    assert world["labels"][i] != label
    query = encoded(world, i)[0][0].astype(np.float64)
    want_keys, _ = brute_force(world, query, 3, label=label)
    answer = search_multipart(client, world, png(world["pixels"][i]), k="3", exact="true",
                              filter=json.dumps({"label": [label]}))
    assert answer.status_code == 200, answer.text
    assert [h["key"] for h in answer.json()["results"]] == want_keys
    answer = search_raw(client, world, png(world["pixels"][i]), k=3, metric="cosine",
                        exact="true")
    assert answer.status_code == 200, answer.text
    unit = {k: v / np.linalg.norm(v) for k, v in world["latents"].items()}
    cosine = sorted(unit, key=lambda k: 1 - unit[k] @ (query / np.linalg.norm(query)))[:3]
    assert [h["key"] for h in answer.json()["results"]] == cosine


def test_encode_by_image_equals_the_items_values_and_onnxruntime(client, world):
    i = 11
    mu, logvar = encoded(world, i)
    by_image = client.post(f"/v1/models/{world['model']}/encode",
                           files={"image": ("q.png", png(world["pixels"][i]), "image/png")})
    assert by_image.status_code == 200, by_image.text
    by_json = client.post(f"/v1/models/{world['model']}/encode",
                          json={"x": values(world["pixels"][i:i + 1]).tolist()})
    assert by_json.status_code == 200, by_json.text
    assert by_image.json() == by_json.json()
    np.testing.assert_allclose(by_image.json()["mu"], mu, atol=1e-6)
    np.testing.assert_allclose(by_image.json()["logvar"], logvar, atol=1e-6)
    raw = client.post(f"/v1/models/{world['model']}/encode", content=png(world["pixels"][i]),
                      headers={"Content-Type": "image/png"})
    assert raw.json() == by_image.json()


def test_score_by_image_equals_the_items_values_with_the_threshold(client, world):
    i = 2
    model = world["model"]
    image = png(world["pixels"][i])
    by_image = client.post(f"/v1/models/{model}/score", data={"fpr": "0.25", "seed": "3"},
                           files={"image": ("q.png", image, "image/png")})
    assert by_image.status_code == 200, by_image.text
    by_json = client.post(f"/v1/models/{model}/score", params={"fpr": 0.25, "seed": 3},
                          json={"x": values(world["pixels"][i:i + 1]).tolist()})
    assert by_json.status_code == 200, by_json.text
    assert by_image.json() == by_json.json()
    got = by_image.json()
    assert got["n_items"] == 1 and got["threshold"]["value"] == pytest.approx(-150.0)
    assert got["is_outlier"] == [got["elbo"][0] < -150.0]
    raw = client.post(f"/v1/models/{model}/score", params={"fpr": 0.25, "seed": 3},
                      content=image, headers={"Content-Type": "image/png"})
    assert raw.json() == got
    with_draws = client.post(f"/v1/models/{model}/score", params={"importance_samples": 4},
                             content=image, headers={"Content-Type": "image/png"})
    assert with_draws.status_code == 200 and with_draws.json()["log_px"] is not None


def png_declaring(width, height):
    """A PNG whose header declares width x height pixels, with no pixel data. (Past
    Pillow's own bomb limit, 89 M pixels, its refusal comes first, with another reason.)"""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height,
                                                                 8, 2, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_bad_images_and_bad_bodies_get_a_clear_4xx(client, world, api_settings):
    model, arrays_model = world["model"], world["arrays_model"]
    item = png(world["pixels"][0])
    cases = [
        (client.post(f"/v1/models/{arrays_model}/encode", content=item,
                     headers={"Content-Type": "image/png"}),
         409, "was not registered from images"),
        (search_raw(client, world, item, kind="text/plain"), 415, "not accepted"),
        (client.post(f"/v1/models/{model}/encode", content=item,
                     headers={"Content-Type": "image/gif"}), 415, "image/gif"),
        (search_raw(client, world, b"not an image at all"), 422, "cannot be used"),
        (search_raw(client, world, item[:60]), 422, "cannot be used"),
        (search_raw(client, world, png(np.zeros((3, 16, 16), np.uint8))), 422,
         "decodes to [3, 16, 16]"),
        (search_raw(client, world, png(np.zeros((1, 8, 8), np.uint8))[:0]), 422, "empty"),
        (search_raw(client, world, png_declaring(9000, 8000)), 422,
         f"the limit is {api_settings.max_image_pixels}"),
        (search_raw(client, world, item, k=5, vector="1"), 422, "unknown parameter 'vector'"),
        (search_multipart(client, world, item, filter="{label"), 422, "'filter' must be JSON"),
        (search_multipart(client, world, item, filter="[" * 60_000), 422,
         "'filter' must be JSON"),  # nesting: never a RecursionError (a 500)
        (search_multipart(client, world, item, k="0"), 422, "k"),
        (search_multipart(client, world, item, colour="red"), 422, "unknown form field"),
        (client.post(f"/v1/embeddings/{world['set']}/search", data={"k": "3"},
                     files={"picture": ("q.png", item, "image/png")}), 422, "'image'"),
        (client.post(f"/v1/models/{model}/score", data={"fpr": "0.9"},
                     files={"image": ("q.png", item, "image/png")}), 422, "fpr"),
        (search_raw(client, world, b"\x89PNG" + bytes(api_settings.max_request_bytes)),
         413, "LATENTBANK_MAX_REQUEST_BYTES"),
    ]
    for answer, status, words in cases:
        assert answer.status_code == status, (status, words, answer.text)
        assert words in answer.json()["error"]["message"], (words, answer.text)


def test_the_openapi_schema_documents_both_image_forms(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/embeddings/{set_id}/search", "/v1/models/{model_id}/encode",
                 "/v1/models/{model_id}/score"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data", "image/png", "image/jpeg",
                "image/webp"} <= set(content), path
        assert "image" in content["multipart/form-data"]["schema"]["properties"], path
    form = paths["/v1/embeddings/{set_id}/search"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]
    assert {"k", "metric", "exact", "filter"} <= set(form)


def test_the_cli_searches_by_image(client, world, api, keys, tmp_path):
    i = 9
    path = tmp_path / "query.png"
    path.write_bytes(png(world["pixels"][i]))
    env = {"LATENTBANK_URL": api.url, "LATENTBANK_API_KEY": keys["read"]}
    out = cli(tmp_path / "cli", "search", world["set"], "--image", path, "-k", 4, "--exact",
              "--json", **env)
    assert out.returncode == 0, out.stderr
    want_keys, _ = brute_force(world, encoded(world, i)[0][0].astype(np.float64), 4)
    assert [h["key"] for h in json.loads(out.stdout)["results"]] == want_keys
    assert json.loads(out.stdout) == search_raw(client, world, path.read_bytes(), k=4,
                                                exact="true").json()
    out = cli(tmp_path / "cli", "search", world["set"], "--image", path, "-k", 3, "--exact",
              "--filter", json.dumps({"label": ["blue"]}), "--json", **env)
    assert out.returncode == 0, out.stderr
    want_keys, _ = brute_force(world, encoded(world, i)[0][0].astype(np.float64), 3, "blue")
    assert [h["key"] for h in json.loads(out.stdout)["results"]] == want_keys
    table = cli(tmp_path / "cli", "search", world["set"], "--image", path, "-k", 2, **env)
    assert table.returncode == 0 and world["keys"][i] in table.stdout, table.stderr
    missing = cli(tmp_path / "cli", "search", world["set"], "--image", tmp_path / "no.png",
                  **env)
    assert missing.returncode != 0 and "no.png" in missing.stderr + missing.stdout


def test_items_and_thumbnails_of_8_bit_rgb_items(client, api_db, api_settings):
    pixels, labels = generated_pixels(6, seed=8)
    ds, keys = register_images(api_db, api_settings, f"rgb8-{time.monotonic_ns()}", pixels,
                               labels, uint8_storage=True)
    page = client.get(f"/v1/datasets/{ds.id}/items", params={"offset": 1, "limit": 4}).json()
    assert page["keys"] == keys[1:5] and page["item_shape"] == list(SHAPE)
    np.testing.assert_allclose(page["x"], pixels[1:5] / 255.0, atol=1e-7)
    answer = client.get(f"/v1/datasets/{ds.id}/thumbnails.png",
                        params={"n": 5, "columns": 3})
    assert answer.status_code == 200, answer.text
    drawn = np.asarray(Image.open(io.BytesIO(answer.content)))
    # the grid built here: black canvas, 1-pixel borders, each pixel 4x4
    canvas = np.zeros((2 * 9 + 1, 3 * 9 + 1, 3), np.uint8)
    for i in range(5):
        r, q = divmod(i, 3)
        canvas[1 + 9 * r:9 + 9 * r, 1 + 9 * q:9 + 9 * q] = pixels[i].transpose(1, 2, 0)
    np.testing.assert_array_equal(drawn, canvas.repeat(4, axis=0).repeat(4, axis=1))


def settled(client, set_id, timeout=120):
    """The set once its index build (sent after the job succeeded) has written its
    statistics, or at once when no index is owed: after that nothing changes it by itself."""
    def ended():
        es = client.get(f"/v1/embeddings/{set_id}").json()
        return es if es["index_status"] in ("none", "failed") or "index" in (
            es["stats"] or {}) else None

    return wait(f"set {set_id}'s index to settle", ended, timeout, every=0.2)


def test_a_set_of_arrays_refuses_an_image_search_with_the_reason(client, world):
    model = world["arrays_model"]
    dataset_id = client.get(f"/v1/models/{model}").json()["dataset_id"]
    answer = client.post("/v1/embedding-jobs", json={"model_id": model,
                                                     "dataset_id": dataset_id})
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["status"] == "succeeded", job
    set_id = job["embedding_set_id"]
    before = settled(client, set_id)
    answer = client.post(f"/v1/embeddings/{set_id}/search", data={"k": "3"},
                         files={"image": ("q.png", png(world["pixels"][0]), "image/png")})
    assert answer.status_code == 409, answer.text
    assert (f"dataset {dataset_id} was not registered from images"
            in answer.json()["error"]["message"])
    assert client.get(f"/v1/embeddings/{set_id}").json() == before  # nothing changed


def expected_grid(items, columns, scale=4):
    """image_grid's layout built here: black canvas, 1-pixel borders, `scale`x pixels."""
    n, c, hgt, wid = items.shape
    rows = -(-n // columns)
    canvas = np.zeros((rows * (hgt + 1) + 1, columns * (wid + 1) + 1, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, columns)
        canvas[1 + r * (hgt + 1):1 + r * (hgt + 1) + hgt,
               1 + q * (wid + 1):1 + q * (wid + 1) + wid] = np.rint(
            np.clip(items[i], 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def png_answer(answer):
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(answer.content)))


def test_decoded_rgb_items_come_back_as_colour_grids_and_npy(client, world):
    model = world["model"]
    sample = {"n": 5, "seed": 7}
    as_json = client.post(f"/v1/models/{model}/sample", json=sample).json()
    x = np.asarray(as_json["x"], np.float32)
    assert x.shape == (5, *SHAPE)
    drawn = png_answer(client.post(f"/v1/models/{model}/sample", json=sample,
                                   headers={"Accept": "image/png"}))
    assert drawn.shape[2] == 3  # RGB
    np.testing.assert_array_equal(drawn, expected_grid(x, 5))
    npy = client.post(f"/v1/models/{model}/sample", json=sample,
                      headers={"Accept": "application/x-npy"})
    np.testing.assert_array_equal(np.load(io.BytesIO(npy.content), allow_pickle=False), x)
    # reconstructions of an image: the decoder's mean at the image's mu, drawn in colour
    mu = encoded(world, 3)[0]
    mean = np.asarray(client.post(f"/v1/models/{model}/decode", json={"z": mu.tolist()}
                                  ).json()["x"], np.float32)
    drawn = png_answer(client.post(f"/v1/models/{model}/reconstruct",
                                   content=png(world["pixels"][3]),
                                   headers={"Content-Type": "image/png",
                                            "Accept": "image/png"}))
    np.testing.assert_array_equal(drawn, expected_grid(mean, 1))
    traverse = {"z": [0.0] * 4, "dims": [0, 2], "steps": 3, "span": 2.0}
    z = np.zeros((6, 4), np.float32)
    z[0:3, 0] = z[3:6, 2] = [-2.0, 0.0, 2.0]
    mean = np.asarray(client.post(f"/v1/models/{model}/decode", json={"z": z.tolist()}
                                  ).json()["x"], np.float32)
    drawn = png_answer(client.post(f"/v1/models/{model}/traverse", json=traverse,
                                   headers={"Accept": "image/png"}))
    np.testing.assert_array_equal(drawn, expected_grid(mean, 3))


def test_a_jpeg_query_is_decoded_as_pillow_decodes_it(client, world):
    i = 14
    buffer = io.BytesIO()
    Image.fromarray(world["pixels"][i].transpose(1, 2, 0)).save(buffer, format="JPEG",
                                                                quality=90)
    jpeg = buffer.getvalue()
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).transpose(2, 0, 1)
    x = (pixels[None].astype(np.float64) / 255).astype(np.float32)
    query = world["encoder"].run(None, {world["encoder"].get_inputs()[0].name: x})[0][0]
    want_keys, want_distances = brute_force(world, query.astype(np.float64), 5)
    answer = search_raw(client, world, jpeg, kind="image/jpeg", k=5, exact="true")
    assert answer.status_code == 200, answer.text
    assert [h["key"] for h in answer.json()["results"]] == want_keys
    np.testing.assert_allclose([h["distance"] for h in answer.json()["results"]],
                               want_distances, rtol=1e-4, atol=1e-4)


def test_thumbnails_of_rgb_float_items_are_scaled_by_the_value_range(client, world):
    ds = world["dataset"]
    drawn = png_answer(client.get(f"/v1/datasets/{ds.id}/thumbnails.png",
                                  params={"n": 4, "columns": 4}))
    lo, hi = min(0.0, ds.min_value), ds.max_value
    items = (values(world["pixels"][:4]) - lo) / (hi - lo)
    np.testing.assert_array_equal(drawn, expected_grid(items, 4))


def test_a_dequantising_model_takes_an_image_as_its_integers(client, api_db, api_settings,
                                                             world, tmp_path):
    """A model with uniform dequantisation (levels 256) sees 8-bit items as the integers
    0 .. 255: by image, the same codes as the item's integers sent as JSON, not as x / 255
    (which it refuses: not integers)."""
    from store.tables import Model

    config = {**MODEL, "dequantize": "uniform", "levels": 256}
    model_id, _ = store_untrained_model(api_db, api_settings, str(tmp_path), config)
    with api_db.session() as s:
        s.get(Model, model_id).dataset_id = world["dataset"].id
    i = 6
    by_image = client.post(f"/v1/models/{model_id}/encode", content=png(world["pixels"][i]),
                           headers={"Content-Type": "image/png"})
    assert by_image.status_code == 200, by_image.text
    integers = world["pixels"][i:i + 1].astype(int).tolist()
    by_json = client.post(f"/v1/models/{model_id}/encode", json={"x": integers})
    assert by_json.status_code == 200, by_json.text
    assert by_image.json() == by_json.json()
    scaled = client.post(f"/v1/models/{model_id}/encode",
                         json={"x": values(world["pixels"][i:i + 1]).tolist()})
    assert scaled.status_code == 422 and "integers 0 .. 255" in scaled.text
