"""The dataset registry against real PostgreSQL: every format, and every bad input
rejected with its message and nothing left behind."""

import os
import tracemalloc

import numpy as np
import pytest

from ingest.arrays import (
    register_file,
)
from store.datasets import dataset_array, delete_dataset, item_rows
from store.errors import (
    Conflict,
    DatasetError,
    NotFound,
)
from tests.support import counts, stored_files, unique_name


def test_same_content_twice_is_recognised(db, artifacts, settings, tmp_path, request):
    np.save(tmp_path / "a.npy", np.eye(4, dtype=np.float64))
    first = register_file(db, artifacts, settings, unique_name(request) + "-1",
                          str(tmp_path / "a.npy"))
    before = counts(db), stored_files(artifacts)
    again = register_file(db, artifacts, settings, unique_name(request) + "-2",
                          str(tmp_path / "a.npy"))
    assert not again.created and again.dataset.id == first.dataset.id
    assert (counts(db), stored_files(artifacts)) == before
    # A client's honest retry (same name, same content) is answered with the dataset.
    retry = register_file(db, artifacts, settings, unique_name(request) + "-1",
                          str(tmp_path / "a.npy"))
    assert not retry.created and retry.dataset.id == first.dataset.id
    assert (counts(db), stored_files(artifacts)) == before
    np.save(tmp_path / "b.npy", np.ones((2, 4)))
    with pytest.raises(Conflict, match="already exists"):
        register_file(db, artifacts, settings, unique_name(request) + "-1",
                      str(tmp_path / "b.npy"))
    assert (counts(db), stored_files(artifacts)) == before
    assert not os.listdir(artifacts.local_path("tmp"))  # no ingest file left behind


def test_8bit_content_tells_no_label_from_the_label_none(db, artifacts, settings, request):
    """The same pixels and keys, once without labels and once labelled "None": two
    datasets (the second must not be answered with the first, losing its labels)."""
    from store.datasets import Chunk, Source, register_dataset

    pixels = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)

    def source(labels):
        return Source("images", (3, 2, 2), "uint8", 2,
                      iter([Chunk(pixels, ["a.png", "b.png"], labels)]), pixels=True)

    bare = register_dataset(db, artifacts, settings, unique_name(request) + "-bare",
                            source(None))
    named = register_dataset(db, artifacts, settings, unique_name(request) + "-none",
                             source(["None", "None"]))
    assert bare.created and named.created and named.dataset.id != bare.dataset.id
    assert [r.label for r in item_rows(db, named.dataset.id, 0, 2)] == ["None", "None"]
    assert bare.dataset.dtype == "uint8" and bare.dataset.max_value == pytest.approx(23 / 255)


def test_leftovers_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from store.leftovers import sweep_leftovers

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"{dead.pid}-upload").mkdir()
    (tmp_path / f"{dead.pid}-upload" / "data.npy").write_bytes(b"partial")
    (tmp_path / f"ingest-{dead.pid}-x.npy").write_bytes(b"partial")
    (tmp_path / f"ingest-{os.getpid()}-y.npy").write_bytes(b"in flight")
    (tmp_path / "unrelated.npy").write_bytes(b"keep")
    removed = sweep_leftovers(tmp_path, None)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [f"{dead.pid}-upload", f"ingest-{dead.pid}-x.npy"])
    assert sorted(os.listdir(tmp_path)) == sorted([f"ingest-{os.getpid()}-y.npy",
                                                   "unrelated.npy"])


def test_duplicate_key_found_in_a_later_chunk_rolls_back_everything(db, artifacts, settings,
                                                                    tmp_path, monkeypatch):
    import ingest.plan

    monkeypatch.setattr(ingest.plan, "CHUNK_BYTES", 64)  # 8 rows of 2 float32 per chunk
    keys = np.array([f"k{i}" for i in range(40)] + ["k3"])
    np.savez(tmp_path / "d.npz", x=np.zeros((41, 2), np.float32), keys=keys)
    before = counts(db), stored_files(artifacts)
    with pytest.raises(DatasetError, match="duplicate key 'k3'"):
        register_file(db, artifacts, settings, "late-duplicate", str(tmp_path / "d.npz"))
    assert (counts(db), stored_files(artifacts)) == before


def test_ingest_streams_in_bounded_memory(db, artifacts, settings, tmp_path, request):
    n, d = 150_000, 64  # 38 MiB as float32, 77 MiB as float64 on disk
    out = np.lib.format.open_memmap(tmp_path / "big.npy", mode="w+", dtype=np.float64,
                                    shape=(n, d))
    for a in range(0, n, 10_000):
        out[a:a + 10_000] = np.random.default_rng(a).random((10_000, d))
    out.flush()
    del out
    tracemalloc.start()
    reg = register_file(db, artifacts, settings, unique_name(request),
                        str(tmp_path / "big.npy"))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    file_size = os.path.getsize(tmp_path / "big.npy")
    assert reg.dataset.n_items == n
    assert peak < file_size / 2, (peak, file_size)  # chunks of 16 MiB, never the whole file
    stored = dataset_array(artifacts, reg.dataset, str(tmp_path))
    np.testing.assert_array_equal(stored[123_456],
                                  np.random.default_rng(120_000).random((10_000, d))[3456]
                                  .astype(np.float32))


def test_delete_dataset(db, artifacts, settings, tmp_path, request):
    np.save(tmp_path / "x.npy", np.full((3, 2), 7.0))
    ds = register_file(db, artifacts, settings, unique_name(request),
                       str(tmp_path / "x.npy")).dataset
    delete_dataset(db, artifacts, ds.id)
    assert not artifacts.exists(ds.artifact_key) and item_rows(db, ds.id, 0, 10) == []
    with pytest.raises(NotFound):
        delete_dataset(db, artifacts, ds.id)
