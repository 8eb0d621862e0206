"""The array readers (ingest/arrays.py), through the store into real PostgreSQL: every
format, every bad file rejected with its message and nothing left behind, and server-side
paths confined to the allowed roots."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.arrays import (
    IngestOptions,
    register_digits,
    register_file,
)
from ingest.paths import resolve_allowed_path
from store.datasets import dataset_array, item_rows
from store.errors import DatasetError, PathNotAllowed, TooLarge, UnsupportedFormat
from tests.support import counts, stored_files, unique_name


def test_npy_with_labels_and_keys(db, artifacts, settings, tmp_path, request):
    data = np.random.default_rng(0).integers(0, 255, size=(50, 2, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", data)
    np.save(tmp_path / "labels.npy", np.arange(50) % 4)
    np.save(tmp_path / "keys.npy", np.array([f"img-{i:03d}" for i in range(50)]))
    reg = register_file(db, artifacts, settings, unique_name(request),
                        str(tmp_path / "x.npy"),
                        options=IngestOptions(labels_path=str(tmp_path / "labels.npy"),
                                                 keys_path=str(tmp_path / "keys.npy")))
    ds = reg.dataset
    assert reg.created and ds.n_items == 50 and ds.item_shape == [2, 3]
    assert ds.source_dtype == "uint8" and ds.dtype == "float32" and ds.has_labels
    assert (ds.min_value, ds.max_value) == (float(data.min()), float(data.max()))
    stored = dataset_array(artifacts, ds, str(tmp_path / "cache"))
    assert stored.dtype == np.float32 and isinstance(stored, np.memmap)
    np.testing.assert_array_equal(stored, data.astype(np.float32))
    items = item_rows(db, ds.id, 0, 50)
    assert [i.key for i in items[:2]] == ["img-000", "img-001"]
    assert [i.label for i in items[:5]] == ["0", "1", "2", "3", "0"]
    assert artifacts.sha256(ds.artifact_key) == artifacts.sha256(ds.artifact_key)


def test_npz_with_keys_and_labels(db, artifacts, settings, tmp_path, request):
    x = np.random.default_rng(1).random((30, 5)).astype(np.float32)
    np.savez_compressed(tmp_path / "d.npz", x=x, labels=np.array(["cat", "dog"] * 15),
                        keys=np.arange(100, 130))
    ds = register_file(db, artifacts, settings, unique_name(request),
                       str(tmp_path / "d.npz")).dataset
    np.testing.assert_array_equal(dataset_array(artifacts, ds, str(tmp_path)), x)
    items = item_rows(db, ds.id, 0, 2)
    assert [(i.key, i.label) for i in items] == [("100", "cat"), ("101", "dog")]


def test_parquet_numeric_columns_key_label_metadata(db, artifacts, settings, tmp_path, request):
    n = 40
    table = pa.table({"id": [f"r{i}" for i in range(n)], "a": np.arange(n, dtype=np.int32),
                      "b": np.linspace(0, 1, n), "y": [i % 3 for i in range(n)],
                      "city": ["Oslo", "Lima"] * (n // 2)})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=7)
    ds = register_file(db, artifacts, settings, unique_name(request),
                       str(tmp_path / "t.parquet"),
                       options=IngestOptions(key_column="id", label_column="y",
                                                metadata_columns=["city"])).dataset
    assert ds.item_shape == [2] and ds.n_items == n
    want = np.stack([np.arange(n), np.linspace(0, 1, n)], 1).astype(np.float32)
    np.testing.assert_array_equal(dataset_array(artifacts, ds, str(tmp_path)), want)
    item = item_rows(db, ds.id, 3, 4)[0]
    assert (item.key, item.label, item.metadata_) == ("r3", "0", {"city": "Lima"})


def test_parquet_list_column_and_csv(db, artifacts, settings, tmp_path, request):
    vectors = np.random.default_rng(2).random((20, 6))
    pq.write_table(pa.table({"v": list(vectors), "name": [f"k{i}" for i in range(20)]}),
                   tmp_path / "l.parquet")
    ds = register_file(db, artifacts, settings, unique_name(request) + "-pq",
                       str(tmp_path / "l.parquet"),
                       options=IngestOptions(key_column="name")).dataset
    assert ds.item_shape == [6]
    np.testing.assert_allclose(dataset_array(artifacts, ds, str(tmp_path)), vectors, rtol=1e-7)
    lines = ["key,x1,x2,label"] + [f"k{i},{i * 0.5},{-i},{i % 2}" for i in range(25)]
    (tmp_path / "c.csv").write_text("\n".join(lines) + "\n")
    ds = register_file(db, artifacts, settings, unique_name(request) + "-csv",
                       str(tmp_path / "c.csv"),
                       options=IngestOptions(key_column="key", label_column="label")).dataset
    assert ds.n_items == 25 and ds.item_shape == [2]
    arr = dataset_array(artifacts, ds, str(tmp_path))
    np.testing.assert_array_equal(arr[4], [2.0, -4.0])


def test_builtin_digits(db, artifacts, settings):
    from sklearn.datasets import load_digits

    reg = register_digits(db, artifacts, settings, name="digits-test")
    arr = dataset_array(artifacts, reg.dataset, "/nonexistent")
    assert arr.shape == (1797, 1, 8, 8) and reg.dataset.source_uri == "builtin:digits"
    np.testing.assert_array_equal(arr.reshape(1797, 64), load_digits().data / 16.0)
    assert item_rows(db, reg.dataset.id, 10, 11)[0].label == str(load_digits().target[10])
    assert not register_digits(db, artifacts, settings, name="digits-again").created


BAD = {
    "pickled.npy": (lambda p: np.save(p, np.array([{"a": 1}, None], dtype=object)),
                    DatasetError, "Python objects"),
    "strings.npy": (lambda p: np.save(p, np.array([["a", "b"]])), DatasetError,
                    "must be numeric"),
    "complex.npy": (lambda p: np.save(p, np.ones((2, 2), np.complex64)), DatasetError,
                    "must be numeric .*got dtype complex64"),
    "nan.npy": (lambda p: np.save(p, np.array([[0.0, 1.0], [np.nan, 2.0]])), DatasetError,
                r"item 1 has a value that is not finite"),
    "huge.npy": (lambda p: np.save(p, np.array([[1e300, 0.0]])), DatasetError,
                 "overflows float32"),
    "empty.npy": (lambda p: np.save(p, np.zeros((0, 3))), DatasetError, "empty"),
    "scalar.npy": (lambda p: np.save(p, np.float64(3.0)), DatasetError, "scalar"),
    "data.txt": (lambda p: p.write_text("1,2\n"), UnsupportedFormat,
                 r"unsupported file type '\.txt'"),
    "broken.npz": (lambda p: p.write_bytes(b"PK\x03\x04 nonsense"), DatasetError,
                   "not a valid zip"),
    "two.npz": (lambda p: np.savez(p, a=np.ones((2, 2)), b=np.ones((2, 2))), DatasetError,
                "exactly one data array"),
    "ragged.parquet": (lambda p: pq.write_table(pa.table({"v": [[1.0, 2.0], [3.0]]}), p),
                       DatasetError, "inconsistent item shape: row group 0 of column 'v' "
                                     "holds 3 values for 2 rows"),
    "ragged-even.parquet": (  # as many values as rows x the first row's: found while read
        lambda p: pq.write_table(pa.table({"v": [[1.0, 2.0, 3.0], [4.0], [5.0, 6.0]]}), p),
        DatasetError, "inconsistent item shape: row 1 has 1 values"),
    "text.parquet": (lambda p: pq.write_table(pa.table({"a": [1, 2], "s": ["x", "y"]}), p),
                     DatasetError, "column 's' has type string"),
    "missing.csv": (lambda p: p.write_text("a,b\n1,2\n3,\n"), DatasetError,
                    "missing value in column 'b' at row 1"),
    "dupkeys.npz": (lambda p: np.savez(p, x=np.ones((3, 2)), keys=np.array(["a", "b", "a"])),
                    DatasetError, "duplicate key 'a'"),
    "badlabels.npz": (lambda p: np.savez(p, x=np.ones((3, 2)), labels=np.array([1, 2])),
                      DatasetError, "'labels' in the .npz file has 2 entries but the data "
                                    "has 3 items"),
    "toomany.npy": (lambda p: np.save(p, np.ones((11, 2))), TooLarge, "the limit is 10"),
    "wideitems.npy": (lambda p: np.save(p, np.ones((2, 5000))), TooLarge,
                      "5000 values each; the limit is 4096"),
}


@pytest.mark.parametrize("filename", list(BAD))
def test_bad_datasets_rejected_and_nothing_left(db, artifacts, settings, tmp_path, filename):
    make, error, message = BAD[filename]
    settings = settings.model_copy(update={"max_dataset_items": 10, "max_item_values": 4096})
    path = tmp_path / filename
    make(path)
    before = counts(db), stored_files(artifacts)
    with pytest.raises(error, match=message):
        register_file(db, artifacts, settings, f"bad-{filename}", str(path))
    assert (counts(db), stored_files(artifacts)) == before


def test_server_side_paths_are_confined_to_allowed_roots(settings, tmp_path):
    root = settings.allowed_roots[0]
    (root / "ok.npy").write_bytes(b"x")
    assert resolve_allowed_path(str(root / "ok.npy"), settings.allowed_roots) == str(
        (root / "ok.npy").resolve())
    assert resolve_allowed_path((root / "ok.npy").as_uri(), settings.allowed_roots)
    (tmp_path / "secret.npy").write_bytes(b"x")
    os.symlink(tmp_path / "secret.npy", root / "link.npy")
    for uri in (str(tmp_path / "secret.npy"), str(root / ".." / "secret.npy"),
                str(root / "link.npy"), "/etc/passwd"):
        with pytest.raises(PathNotAllowed, match="outside the allowed roots"):
            resolve_allowed_path(uri, settings.allowed_roots)
    with pytest.raises(PathNotAllowed, match="not an absolute path"):
        resolve_allowed_path("relative.npy", settings.allowed_roots)
    with pytest.raises(PathNotAllowed, match="disabled"):
        resolve_allowed_path(str(root / "ok.npy"), [])


def _npz_labels_longer_than_declared(p):
    """labels' header says 3 entries; its data holds 1,000 (today: a ValueError, a 500)."""
    import zipfile

    from tests.service.api.test_hostile_uploads import npy_header

    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x.npy", npy_header((3, 2), "<f8") + bytes(48))
        z.writestr("labels.npy", npy_header((3,)) + bytes(8000))


def _parquet_repeated_long_label(p):
    """One 1 MiB label repeated on 200 rows: 1 MiB in the dictionary, 200 MiB decoded."""
    pq.write_table(pa.table({"x": np.zeros(200), "y": ["a" * (1 << 20)] * 200}), p)


BOUNDED = {
    # (file, limits, error, message): each refused before its values are decoded
    "declared.npy": (lambda p: np.save(p, np.zeros((64, 64), np.float32)),
                     {"max_inflated_bytes": 8192}, TooLarge, r"max_inflated_bytes"),
    "labels-lie.npz": (_npz_labels_longer_than_declared, {}, DatasetError,
                       r"'labels' in the .npz file: its header declares shape \[3\]"),
    "ratio.npz": (lambda p: np.savez_compressed(p, x=np.zeros((1024, 1024), np.float32)),
                  {}, TooLarge, r"max_compression_ratio"),
    "written.csv": (lambda p: p.write_text("a,b\n" + "1,2\n" * 2000),
                    {"max_inflated_bytes": 4096}, TooLarge, r"max_inflated_bytes"),
    "label.parquet": (_parquet_repeated_long_label, {"max_side_chunk_bytes": 8 << 20},
                      TooLarge, r"decode to \d+ bytes; the limit is 8388608 "
                                r"\(max_side_chunk_bytes\)"),
    "temp.npy": (lambda p: np.save(p, np.zeros((64, 64), np.uint8)),
                 {"max_upload_temp_bytes": 8192}, TooLarge, r"max_upload_temp_bytes"),
    "columns.csv": (lambda p: p.write_text(",".join(f"c{i}" for i in range(50)) + "\n"),
                    {"max_table_columns": 20}, TooLarge, r"more than 20 columns"),
}


@pytest.mark.parametrize("filename", list(BOUNDED))
def test_declared_and_decoded_sizes_are_bounded(db, artifacts, settings, tmp_path, filename):
    make, limits, error, message = BOUNDED[filename]
    path = tmp_path / filename
    make(path)
    before = counts(db), stored_files(artifacts)
    with pytest.raises(error, match=message):
        register_file(db, artifacts, settings.model_copy(update=limits), f"b-{filename}",
                      str(path), options=IngestOptions(label_column="y")
                      if filename.endswith(".parquet") else None)
    assert (counts(db), stored_files(artifacts)) == before


def test_side_arrays_stream_with_the_data(db, artifacts, settings, tmp_path, request,
                                          monkeypatch):
    """keys and labels are read a chunk at a time alongside the data, and still line up."""
    import ingest.plan

    monkeypatch.setattr(ingest.plan, "CHUNK_BYTES", 64)  # 4 rows of 2 float64
    x = np.arange(46, dtype=np.float64).reshape(23, 2)
    np.savez_compressed(tmp_path / "s.npz", x=x, keys=np.array([f"k{i}" for i in range(23)]),
                        labels=np.arange(23) % 5)
    ds = register_file(db, artifacts, settings, unique_name(request),
                       str(tmp_path / "s.npz")).dataset
    rows = item_rows(db, ds.id, 0, 23)
    assert [(r.key, r.label) for r in rows] == [(f"k{i}", str(i % 5)) for i in range(23)]
    np.testing.assert_array_equal(dataset_array(artifacts, ds, str(tmp_path)), x)
