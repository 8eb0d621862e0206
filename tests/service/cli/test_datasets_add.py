"""`latentbank datasets add` with ingest jobs, against a live `latentbank up`: a server-side
folder (a --uri) runs as a job whose progress is shown and whose dataset is printed; a
broken source prints the job's error and exits 1; --no-wait answers with the job; a
local folder is packed into a .tar member by member."""

import json

import numpy as np

from tests.support import cli, cli_json


def test_a_server_side_folder_is_a_job_followed_to_its_dataset(stack):
    folder = stack.allowed / "parts"
    folder.mkdir()
    rng = np.random.default_rng(2403)
    parts = [rng.uniform(-2, 3, size=(n, 2, 2)).astype(np.float32) for n in (7, 4, 9)]
    for i, part in enumerate(parts):
        np.save(folder / f"p{i}.npy", part)
    every = np.concatenate(parts)
    d = cli_json(stack.data_dir, "datasets", "add", "--uri", folder, "--name", "parts")
    assert (d["name"], d["n_items"], d["item_shape"], d["source_format"]) == (
        "parts", 20, [2, 2], "npy-folder")
    assert (d["min_value"], d["max_value"]) == (float(every.min()), float(every.max()))
    # the same source again, as a person reads it (a pipe: one line per change of the
    # job), then the dataset already there
    out = cli(stack.data_dir, "datasets", "add", "--uri", folder, "--name", "parts-again")
    assert out.returncode == 0, out.stderr
    assert f"succeeded: dataset {d['id']}" in out.stderr
    assert f"dataset {d['id']}" in out.stdout
    job = cli_json(stack.data_dir, "jobs", "list", "--kind", "ingest")[0]
    assert (job["items_done"], job["dataset_id"]) == (20, d["id"])


def test_a_broken_source_prints_the_job_error_and_exits_1(stack):
    (stack.allowed / "broken.npy").write_bytes(b"\x93NUMPY\x01\x00not a header at all")
    out = cli(stack.data_dir, "datasets", "add", "--uri", stack.allowed / "broken.npy")
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "error: job" in out.stderr and "failed" in out.stderr and ".npy" in out.stderr
    listed = cli_json(stack.data_dir, "datasets", "list")
    assert "broken" not in [x["name"] for x in listed]


def test_no_wait_answers_with_the_job_at_once(stack):
    np.save(stack.allowed / "later.npy", np.arange(12, dtype=np.float32).reshape(6, 2))
    out = cli(stack.data_dir, "datasets", "add", "--uri", stack.allowed / "later.npy",
              "--no-wait", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["mode"] == "job" and answer["job"]["kind"] == "ingest"
    job = cli_json(stack.data_dir, "jobs", "show", answer["job"]["id"])
    assert job["id"] == answer["job"]["id"]


def test_a_local_folder_of_images_is_uploaded_and_is_the_same_dataset_as_its_uri(stack):
    from PIL import Image

    folder = stack.allowed / "photos"
    rng = np.random.default_rng(2404)
    for cls in ("cat", "dog"):
        (folder / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)).save(
                folder / cls / f"{i}.png")
    # an image at the root (first in the order: no label) and one a folder deeper (its
    # label is still its class): the packed tar must give the same keys and labels
    (folder / "cat" / "2020").mkdir()
    for path in (folder / "a.png", folder / "cat" / "2020" / "9.png"):
        Image.fromarray(rng.integers(0, 256, size=(9, 7, 3), dtype=np.uint8)).save(path)
    by_uri = cli_json(stack.data_dir, "datasets", "add", "--uri", folder, "--image-size", "4",
                      "--color", "grey")
    assert (by_uri["name"], by_uri["n_items"], by_uri["item_shape"], by_uri["dtype"]) == (
        "photos", 10, [1, 4, 4], "uint8")
    out = cli(stack.data_dir, "datasets", "add", folder, "--image-size", "4", "--color",
              "grey", "--name", "photos-uploaded")
    assert out.returncode == 0, out.stderr
    # the same pixels, keys and labels from the packed .tar: the job finds the dataset
    assert f"the same content is registered already: dataset {by_uri['id']}" in out.stderr
    jobs = cli_json(stack.data_dir, "jobs", "list", "--kind", "ingest")
    assert jobs[0]["params"]["filename"] == "photos.tar"
    stored = stack.data_dir / "artifacts" / "uploads"  # the job removed its upload
    assert (stored.parent / "datasets").is_dir()  # the store's root indeed
    assert not stored.exists() or not list(stored.iterdir())
