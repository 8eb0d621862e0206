"""Image sources registered through `store.datasets.register_dataset` into the real
embedded PostgreSQL: uint8 storage, the recorded ingest report, all or nothing."""

from __future__ import annotations

import gzip
import re

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.images import ImageSpec
from ingest.paths import resolve_location
from ingest.plan import IngestOptions, Limits, Report, ingest_record
from ingest.readers import plan_source, source_of
from store.datasets import dataset_array, item_rows, register_dataset
from store.errors import DatasetError, TooLarge
from store.settings import Settings
from tests.ingest import data as gen
from tests.support import counts, stored_files, unique_name


def register(db, artifacts, settings, name, uri, **options):
    options.setdefault("max_failure_share", 0.2)
    opts = IngestOptions(**options)
    limits = Limits.of(settings)
    plan = plan_source(resolve_location(str(uri), settings), opts, limits)
    report = Report()
    source = source_of(plan, opts, limits, report)
    return register_dataset(db, artifacts, settings, name, source, source_uri=str(uri),
                            ingest=lambda: ingest_record(plan, opts, report))


@pytest.fixture(scope="module")
def photos():
    return gen.collection()


def _sources(photos, root):
    samples, origin = gen.wds_samples(photos)
    (root / "wds").mkdir()
    gen.write_shards(root / "wds", samples, 3)
    keys = [k for k in photos.files if k not in photos.other]  # a parquet has no README
    pq.write_table(pa.table({"image": [{"bytes": photos.files[k], "path": k} for k in keys],
                             "label": [photos.labels.get(k) for k in keys]}),
                   root / "hf.parquet", row_group_size=4)
    return {
        "images": gen.write_folder(root / "photos", photos.files),
        "zip": gen.write_zip(root / "photos.zip", photos.files),
        "tar": gen.write_tar(root / "photos.tar.gz", photos.files, gz=True),
        "webdataset": root / "wds" / "shard-{000000..000002}.tar",
        "image-parquet": root / "hf.parquet",
    }, origin


def test_every_container_registers_as_uint8_with_its_report(db, artifacts, settings, photos,
                                                            tmp_path, request):
    sources, origin = _sources(photos, settings.allowed_roots[0])
    ids = {}
    for fmt, uri in sources.items():
        extra = {"label_column": "label"} if fmt == "image-parquet" else {}
        reg = register(db, artifacts, settings, f"{unique_name(request)}-{fmt}", uri, **extra)
        ds = reg.dataset
        ids[fmt] = ds.id
        assert ds.dtype == "uint8" and ds.item_shape == [3, gen.H, gen.W]
        assert ds.n_items == 12 and ds.has_labels
        stored = dataset_array(artifacts, ds, str(tmp_path / "cache"))
        assert stored.dtype == np.uint8  # a |u1 .npy
        with open(artifacts.local_path(ds.artifact_key), "rb") as f:
            assert b"'descr': '|u1'" in f.read(256)
        rows = item_rows(db, ds.id, 0, ds.n_items)
        by_key = {r.key: stored[r.index] for r in rows}
        names = {k: origin[k] for k in by_key} if fmt == "webdataset" else {k: k for k in by_key}
        for key, name in names.items():
            np.testing.assert_array_equal(by_key[key], photos.expected[name])
        assert {r.key: r.label for r in rows} == {k: photos.labels[n] for k, n in names.items()}
        every = np.stack([photos.expected[n] for n in names.values()])
        assert ds.min_value == pytest.approx(every.min() / 255.0)
        assert ds.max_value == pytest.approx(every.max() / 255.0)
        record = ds.ingest
        # the same pixels, keys and labels are the same content: the folder's dataset
        assert reg.created == (fmt in ("images", "webdataset"))
        assert record["format"] == (fmt if reg.created else "images")
        assert record["image"] == {"color": "rgb", "size": None}
        assert record["report"]["read"] == 12 and record["report"]["failed"] == 2
        assert len(record["report"]["failures"]) == 2
        assert record["report"]["skipped"] == (0 if fmt == "webdataset" else 1)  # README
    assert len({ids[f] for f in ("images", "zip", "tar", "image-parquet")}) == 1
    assert ids["webdataset"] != ids["images"]


def test_idx_registers_grey_uint8(db, artifacts, settings, tmp_path, request):
    root = settings.allowed_roots[0]
    arrays = np.random.default_rng(1).integers(0, 256, size=(30, 5, 4), dtype=np.uint8)
    (root / "x-images-idx3-ubyte.gz").write_bytes(gzip.compress(gen.idx_bytes(arrays)))
    (root / "x-labels-idx1-ubyte.gz").write_bytes(gzip.compress(gen.idx_bytes(
        labels=np.arange(30) % 10)))
    ds = register(db, artifacts, settings, unique_name(request),
                  root / "x-images-idx3-ubyte.gz").dataset
    assert ds.dtype == "uint8" and ds.item_shape == [1, 5, 4]
    np.testing.assert_array_equal(dataset_array(artifacts, ds, str(tmp_path / "c")),
                                  arrays[:, None])
    assert [r.label for r in item_rows(db, ds.id, 0, 30)] == [str(i % 10) for i in range(30)]


def test_uint8_and_its_float32_twin_are_different_datasets(db, artifacts, settings, tmp_path,
                                                          request):
    """The checksum covers the dtype: the same numbers as uint8 images and as a float32
    array (with the same keys) are two datasets."""
    root = settings.allowed_roots[0]
    pixels = gen.draw("circle", 0)
    gen.write_folder(root / "one", {"0.png": gen.encode(pixels, "PNG")})
    ds = register(db, artifacts, settings, unique_name(request) + "-u8", root / "one").dataset
    from ingest.arrays import register_file

    np.save(root / "twin.npy", pixels.transpose(2, 0, 1)[None].astype(np.float32))
    np.save(root / "keys.npy", np.array(["0.png"]))
    twin = register_file(db, artifacts, settings, unique_name(request) + "-f32",
                         str(root / "twin.npy"),
                         options=IngestOptions(keys_path=str(root / "keys.npy"))).dataset
    assert twin.dtype == "float32" and twin.id != ds.id and twin.checksum != ds.checksum
    again = register(db, artifacts, settings, unique_name(request) + "-again",
                     root / "one").dataset
    assert again.id == ds.id  # the same images again: recognised


def test_refused_sources_leave_nothing(db, artifacts, settings, photos, request):
    root = settings.allowed_roots[0]
    folder = gen.write_folder(root / "photos", photos.files)
    (root / "wds").mkdir()
    gen.write_shards(root / "wds", [{"__key__": "a", "png": photos.files["circle/000.png"]},
                                    {"__key__": "a", "png": photos.files["circle/001.png"]}], 2)
    before = counts(db), stored_files(artifacts)
    with pytest.raises(DatasetError, match="2 of 14 items could not be read"):
        register(db, artifacts, settings, unique_name(request), folder, max_failure_share=0.1)
    with pytest.raises(DatasetError, match="duplicate key 'a'"):
        register(db, artifacts, settings, unique_name(request), root / "wds")
    assert (counts(db), stored_files(artifacts)) == before


def test_image_folder_under_an_allowed_s3_prefix(db, artifacts, s3_endpoint, photos, tmp_path,
                                                 request):
    bucket = f"photos-{tmp_path.name.lower().replace('_', '-')[:40]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    for key, data in photos.files.items():
        client.put_object(Bucket=bucket, Key=f"sets/photos/{key}", Body=data)
    settings = Settings(data_dir=tmp_path / "data", allowed_urls=[f"s3://{bucket}/sets/"],
                        source_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    ds = register(db, artifacts, settings, unique_name(request), f"s3://{bucket}/sets/photos/",
                  image=ImageSpec("grey", (8, 8))).dataset
    assert ds.dtype == "uint8" and ds.item_shape == [1, 8, 8] and ds.n_items == 12
    assert ds.ingest["image"] == {"color": "grey", "size": [8, 8]}
    assert {r.key for r in item_rows(db, ds.id, 0, 12)} == set(photos.expected)
    with pytest.raises(Exception, match="not under an allowed URL prefix"):
        resolve_location(f"s3://{bucket}/other/", settings)


def test_uint8_storage_counts_one_byte_per_value(db, artifacts, settings, photos, request):
    """12 grey items of 16x20 are 3,840 bytes (+256 of header) as uint8, 15,360 as
    float32: a max_inflated_bytes of just that admits them; one byte less refuses. (Grey:
    content of its own, not the rgb folder another test registered in this database.)"""
    root = gen.write_folder(settings.allowed_roots[0] / "photos", photos.files)
    need = 256 + 12 * gen.H * gen.W
    tight = settings.model_copy(update={"max_inflated_bytes": need - 1})
    before = counts(db), stored_files(artifacts)
    with pytest.raises(TooLarge, match="as uint8"):
        register(db, artifacts, tight, unique_name(request), root, image=ImageSpec("grey"))
    assert (counts(db), stored_files(artifacts)) == before
    enough = settings.model_copy(update={"max_inflated_bytes": need})
    reg = register(db, artifacts, enough, unique_name(request), root, image=ImageSpec("grey"))
    assert reg.created and reg.dataset.size_bytes == need


def test_archives_and_shards_under_an_s3_prefix(db, artifacts, s3_endpoint, photos, tmp_path,
                                               request, monkeypatch):
    bucket = f"arch-{tmp_path.name.lower().replace('_', '-')[:40]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="in/p.zip",
                      Body=gen.write_zip(tmp_path / "p.zip", photos.files).read_bytes())
    samples, _ = gen.wds_samples(photos)
    for shard in gen.write_shards(tmp_path, samples, 3):
        client.put_object(Bucket=bucket, Key=f"in/wds/{shard.name}", Body=shard.read_bytes())
    settings = Settings(data_dir=tmp_path / "data", allowed_urls=[f"s3://{bucket}/in/"],
                        source_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    spec = ImageSpec("grey", (12, 12))  # content no other test registers
    zipped = register(db, artifacts, settings, unique_name(request) + "-zip",
                      f"s3://{bucket}/in/p.zip", image=spec).dataset
    assert {r.key for r in item_rows(db, zipped.id, 0, 12)} == set(photos.expected)
    shards = register(db, artifacts, settings, unique_name(request) + "-wds",
                      f"s3://{bucket}/in/wds/shard-{{000000..000002}}.tar", image=spec).dataset
    assert shards.n_items == 12 and shards.ingest["format"] == "webdataset"
    np.testing.assert_array_equal(
        np.sort(dataset_array(artifacts, shards, str(tmp_path / "c")).reshape(12, -1), axis=0),
        np.sort(dataset_array(artifacts, zipped, str(tmp_path / "c")).reshape(12, -1), axis=0))
    data = np.random.default_rng(7).random((40, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    client.put_object(Bucket=bucket, Key="in/x.npy", Body=(tmp_path / "x.npy").read_bytes())
    temp = tmp_path / "temp"
    import ingest.readers

    copies, copy = [], ingest.readers._copy_local
    monkeypatch.setattr(ingest.readers, "_copy_local",
                        lambda *a: copies.append(copy(*a)) or copies[-1])
    arrays = register(db, artifacts, settings.model_copy(update={"data_dir": temp}),
                      unique_name(request) + "-npy", f"s3://{bucket}/in/x.npy").dataset
    np.testing.assert_array_equal(dataset_array(artifacts, arrays, str(tmp_path / "c")), data)
    assert len(copies) == 1 and copies[0].startswith(str(temp))  # copied once, there,
    assert not [p for p in temp.rglob("*") if p.is_file()]  # and gone
    small = settings.model_copy(update={"max_upload_temp_bytes": 100})
    with pytest.raises(TooLarge, match="max_upload_temp_bytes"):
        register(db, artifacts, small, unique_name(request) + "-big", f"s3://{bucket}/in/x.npy")


def _shard(path, samples):
    """One shard: each sample a PNG (4x4, red = the sample's number) and its side members."""
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(path, "w") as tf:
        for key, side in samples:
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (int(key) % 256, 0, 0)).save(buf, "PNG")
            for name, data in [(f"{key}.png", buf.getvalue()),
                               *[(f"{key}.{ext}", d) for ext, d in side]]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize(("ext", "data", "reason"), [
    ("json", b'{"score": NaN}', "its json member holds NaN (not JSON)"),
    ("json", b'{"score": -Infinity}', "its json member holds -Infinity (not JSON)"),
    ("json", b"[" * 100_000, "its json member is nested too deeply"),
    ("json", b'{"a": "x\\u0000y"}', "its metadata contains a NUL character"),
    ("json", b'{"a": "' + b"x" * (70 << 10) + b'"}',
     f"its metadata is {(70 << 10) + 9} bytes as JSON; the limit is 65536"),
    ("txt", b"a\x00b", "its txt member contains a NUL character"),
    ("cls", b"x\x00y", "its cls member contains a NUL character"),
    ("cls", b"c" * 1001, "its label is 1001 characters; the limit is 1000"),
])
def test_one_bad_side_member_is_that_sample_s_failure(db, artifacts, settings, request, ext,
                                                      data, reason):
    """What PostgreSQL would refuse (NUL, NaN) or Python cannot parse (deep json) in one
    sample's side members: the other 9 register, the bad one is named with its reason."""
    root, name = settings.allowed_roots[0], unique_name(request)
    label = name.encode()[-100:]  # each case's good samples its own content (not deduplicated)
    _shard(root / "s.tar", [(f"{i:03d}", [("cls", label)]) for i in range(9)]
           + [("999", [(ext, data)])])
    ds = register(db, artifacts, settings, name, root / "s.tar",
                  format="webdataset", max_failure_share=0.5).dataset
    assert ds.n_items == 9
    assert [r.key for r in item_rows(db, ds.id, 0, 9)] == [f"{i:03d}" for i in range(9)]
    assert ds.ingest["report"]["failures"] == [{"key": "999", "reason": reason}]
    assert ds.ingest["report"]["read"] == 9 and ds.ingest["report"]["failed"] == 1


def test_a_key_with_a_nul_is_that_item_s_failure(db, artifacts, settings, request):
    """A pax path may hold a NUL, which PostgreSQL's text cannot: that item fails, named
    with the NUL written out (the report itself is stored)."""
    import io
    import tarfile

    root, name = settings.allowed_roots[0], unique_name(request)
    with tarfile.open(root / "n.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        for i, key in enumerate(["c/0.png", "c/1.png", "c/a\x00b.png"]):
            png = gen.encode(gen.draw("circle", i), "PNG")
            info = tarfile.TarInfo("x.png")
            info.size, info.pax_headers = len(png), {"path": key}
            tf.addfile(info, io.BytesIO(png))
    ds = register(db, artifacts, settings, name, root / "n.tar", max_failure_share=0.5).dataset
    assert [r.key for r in item_rows(db, ds.id, 0, 2)] == ["c/0.png", "c/1.png"]
    assert ds.ingest["report"]["failures"] == [
        {"key": "c/a\\x00b.png", "reason": "its key contains a NUL character"}]


def test_parquet_cells_that_cannot_be_stored_are_row_failures(db, artifacts, settings,
                                                              request):
    """Per row: a label over 1000 characters, a key with a NUL, a metadata cell over
    64 KiB are that row's failures; a NaN or infinite metadata number is stored as null
    (pandas writes missing floats as NaN), nested ones too."""
    root, name = settings.allowed_roots[0], unique_name(request)
    pngs = [gen.encode(gen.draw("square", i), "PNG") for i in range(8)]
    keys = [f"{name[-40:]}-{i}" for i in range(8)]
    labels = ["s"] * 8
    notes = ["n"] * 8
    scores = [0.5, float("nan"), float("inf"), -1.0, 2.0, 3.0, 4.0, 5.0]
    series = [[1.0, float("-inf")], [], None, [2.0], [], [], [], []]
    labels[2] = "l" * 1001
    keys[3] = "a\x00b"
    notes[4] = "m" * (70 << 10)
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "key": keys,
                             "label": labels, "note": notes, "score": scores,
                             "series": series}), root / "cells.parquet")
    ds = register(db, artifacts, settings, name, root / "cells.parquet", key_column="key",
                  label_column="label", metadata_columns=["score", "series", "note"],
                  max_failure_share=0.5).dataset
    rows = {r.key: r for r in item_rows(db, ds.id, 0, 8)}
    assert sorted(rows) == sorted(keys[i] for i in (0, 1, 5, 6, 7))
    failures = ds.ingest["report"]["failures"]
    assert failures[:2] == [
        {"key": keys[2], "reason": "its label is 1001 characters; the limit is 1000"},
        {"key": "a\\x00b", "reason": "its key contains a NUL character"}]
    assert failures[2]["key"] == keys[4] and len(failures) == 3
    size = int(re.fullmatch(r"its metadata column 'note' is (\d+) bytes; the limit is 65536",
                            failures[2]["reason"])[1])
    assert 70 << 10 <= size <= (70 << 10) + 16  # the text and its Arrow offsets
    assert rows[keys[0]].metadata_ == {"score": 0.5, "series": [1.0, None], "note": "n"}
    assert rows[keys[1]].metadata_ == {"score": None, "series": [], "note": "n"}
    np.testing.assert_array_equal(
        dataset_array(artifacts, ds, str(settings.allowed_roots[0] / "c"))[
            rows[keys[1]].index], gen.draw("square", 1).transpose(2, 0, 1))
