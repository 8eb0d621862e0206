"""The image readers: the same pixels per key whatever the container, labels and keys as
documented, failures counted and named, the failure share enforced."""

from __future__ import annotations

import gzip
import io
import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ingest.images import ImageSpec
from ingest.paths import resolve_location
from ingest.plan import IngestOptions, Limits, Report
from ingest.readers import plan_source, source_of
from store.errors import DatasetError
from tests.ingest import data as gen


def where(root):
    return SimpleNamespace(allowed_roots=[root], allowed_urls=[], source_options={})


def read_all(uri, root, **options):
    """(plan, {key: pixels}, {key: label}, {key: metadata}, report) through the contract."""
    options.setdefault("max_failure_share", 0.5)
    opts = IngestOptions(**options)
    plan = plan_source(resolve_location(str(uri), where(root)), opts, Limits())
    report = Report()
    source = source_of(plan, opts, Limits(), report)
    pixels, labels, meta = {}, {}, {}
    for chunk in source.chunks:
        assert chunk.values.dtype == np.uint8 and chunk.values.ndim == 4
        for i, key in enumerate(chunk.keys):
            assert key not in pixels
            pixels[key] = chunk.values[i]
            labels[key] = chunk.labels[i] if chunk.labels else None
            meta[key] = chunk.metadata[i] if chunk.metadata else None
    assert source.pixels and source.dtype == "uint8"
    return plan, pixels, labels, meta, report


@pytest.fixture(scope="module")
def photos():
    return gen.collection()


def check_collection(photos, pixels, labels, report, keys=None):
    keys = keys or {k: k for k in photos.expected}
    assert sorted(pixels) == sorted(keys)
    for key, origin in keys.items():
        np.testing.assert_array_equal(pixels[key], photos.expected[origin])
        assert labels[key] == photos.labels[origin]
    assert report.read == 12 and report.failed == 2


@pytest.mark.parametrize("container", ["folder", "zip", "tar", "tar.gz"])
def test_image_folder_layout_in_every_container(photos, tmp_path, container):
    if container == "folder":
        uri = gen.write_folder(tmp_path / "photos", photos.files)
    elif container == "zip":
        uri = gen.write_zip(tmp_path / "photos.zip", photos.files)
    else:
        uri = gen.write_tar(tmp_path / f"photos.{container}", photos.files,  # `tar -C`, or
                            gz=container == "tar.gz",  # of the folder itself
                            top="./" if container == "tar" else "photos/")
    plan, pixels, labels, _, report = read_all(uri, tmp_path)
    assert plan.format == {"folder": "images", "zip": "zip"}.get(container, "tar")
    check_collection(photos, pixels, labels, report)
    assert {f["key"] for f in report.failures} == set(photos.bad)
    assert all("image" in f["reason"] for f in report.failures)
    assert report.skipped == 1  # README.txt
    if container in ("folder", "zip"):  # sorted order
        assert list(pixels) == sorted(pixels)


def test_webdataset_shards_by_brace_pattern_folder_and_single(photos, tmp_path):
    samples, origin = gen.wds_samples(photos)
    folder = tmp_path / "wds"
    folder.mkdir()
    shards = gen.write_shards(folder, samples, 3)
    good = {k: o for k, o in origin.items() if o in photos.expected}
    for uri in (folder / "shard-{000000..000002}.tar", folder):
        plan, pixels, labels, meta, report = read_all(uri, tmp_path)
        assert plan.format == "webdataset" and len(plan.units) == 3
        check_collection(photos, pixels, labels, report, good)
        assert {f["key"] for f in report.failures} == {
            k for k, o in origin.items() if o in photos.bad}
        for key, o in good.items():
            assert meta[key]["source"] == o
            if int(key) % 2:
                assert meta[key]["txt"] == f"a {photos.labels[o]}"
    _, pixels, *_ = read_all(shards[1], tmp_path)
    assert plan_source(resolve_location(str(shards[1]), where(tmp_path)), IngestOptions(),
                       Limits()).format == "webdataset"
    assert set(pixels) == {s["__key__"] for s in samples[5:10]} - {
        k for k, o in origin.items() if o in photos.bad}


def test_image_parquet_struct_and_binary_columns(photos, tmp_path):
    keys = list(photos.expected) + photos.bad
    images = [{"bytes": photos.files[k], "path": k} for k in keys]
    table = pa.table({"image": images, "label": [photos.labels.get(k, "x") for k in keys],
                      "n": list(range(len(keys)))})
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=5)
    plan, pixels, labels, meta, report = read_all(
        tmp_path / "hf.parquet", tmp_path, label_column="label", metadata_columns=["n"])
    assert plan.format == "image-parquet" and len(plan.units) == 3
    check_collection(photos, pixels, labels, report)
    assert [meta[k]["n"] for k in photos.expected] == list(range(12))
    raw = pa.table({"png": pa.array([photos.files[k] for k in keys], pa.binary()),
                    "label": [photos.labels.get(k, "x") for k in keys]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    _, pixels, labels, _, report = read_all(tmp_path / "raw.parquet", tmp_path,
                                            label_column="label")
    check_collection(photos, pixels, labels, report,
                     {str(i): k for i, k in enumerate(photos.expected)})
    assert {f["key"] for f in report.failures} == {"12", "13"}


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_with_labels(tmp_path, gz):
    rng = np.random.default_rng(3)
    arrays = rng.integers(0, 256, size=(70, 7, 6), dtype=np.uint8)
    digits = rng.integers(0, 10, size=70, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write = gzip.compress if gz else (lambda b: b)
    (tmp_path / f"t10k-images-idx3-ubyte{suffix}").write_bytes(write(gen.idx_bytes(arrays)))
    (tmp_path / f"t10k-labels-idx1-ubyte{suffix}").write_bytes(
        write(gen.idx_bytes(labels=digits)))
    plan, pixels, labels, _, report = read_all(tmp_path / f"t10k-images-idx3-ubyte{suffix}",
                                               tmp_path)
    assert plan.format == "idx" and plan.image == ImageSpec("grey", None)
    assert list(pixels) == [str(i) for i in range(70)]
    np.testing.assert_array_equal(np.stack(list(pixels.values())), arrays[:, None])
    assert [labels[str(i)] for i in range(70)] == [str(d) for d in digits]
    assert report.read == 70 and report.failed == 0


def test_idx_declaring_more_than_it_holds_is_refused(tmp_path):
    body = gen.idx_bytes(np.zeros((10, 4, 4), np.uint8))[:-5]
    (tmp_path / "a-images-idx3-ubyte").write_bytes(body)
    with pytest.raises(DatasetError, match="declares 10 items"):
        read_all(tmp_path / "a-images-idx3-ubyte", tmp_path)
    (tmp_path / "b-images-idx3-ubyte.gz").write_bytes(gzip.compress(body))
    with pytest.raises(DatasetError, match="truncated"):
        read_all(tmp_path / "b-images-idx3-ubyte.gz", tmp_path)


def test_failure_share_refuses_with_the_report(photos, tmp_path):
    root = gen.write_folder(tmp_path / "photos", photos.files)
    with pytest.raises(DatasetError) as err:
        read_all(root, tmp_path, max_failure_share=0.05)
    message = str(err.value)
    assert "2 of 14 items" in message and "14.3%" in message
    assert "circle/broken.png: " in message and "square/fake.png: " in message


def test_without_image_size_another_size_is_a_named_failure(photos, tmp_path):
    files = dict(photos.files)
    files["triangle/big.png"] = gen.encode(gen.draw("triangle", 1, (30, 24)), "PNG")
    _, pixels, _, _, report = read_all(gen.write_folder(tmp_path / "p", files), tmp_path)
    assert "triangle/big.png" not in pixels and report.failed == 3
    reason = next(f["reason"] for f in report.failures if f["key"] == "triangle/big.png")
    assert "24x30" in reason and f"{gen.H}x{gen.W}" in reason and "image_size" in reason


def _resize_crop(pixels: np.ndarray, h: int, w: int, grey: bool) -> np.ndarray:
    """The documented transform written out with Pillow: the largest centred box of
    aspect W:H in the source (fractional edges), resized to W x H bilinear."""
    image = Image.fromarray(pixels).convert("L" if grey else "RGB")
    sw, sh = image.size
    if sw / sh > w / h:
        bw, bh = sh * w / h, sh
    else:
        bw, bh = sw, sw * h / w
    box = ((sw - bw) / 2, (sh - bh) / 2, (sw + bw) / 2, (sh + bh) / 2)
    image = image.resize((w, h), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
    arr = np.asarray(image)
    return arr[None] if grey else arr.transpose(2, 0, 1)


@pytest.mark.parametrize("color", ["rgb", "grey"])
def test_image_size_resizes_and_centre_crops_mixed_sizes(tmp_path, color):
    sizes = [(20, 16), (31, 47), (64, 24), (12, 12)]
    files, expected = {}, {}
    for i, size in enumerate(sizes):
        pixels = gen.draw("circle", i, size)
        files[f"c/{i}.png"] = gen.encode(pixels, "PNG")
        expected[f"c/{i}.png"] = _resize_crop(pixels, 10, 14, color == "grey")
    root = gen.write_folder(tmp_path / "mixed", files)
    plan, pixels, *_ = read_all(root, tmp_path, image=ImageSpec(color, (10, 14)))
    assert plan.item_shape == ((1 if color == "grey" else 3), 10, 14)
    for key, want in expected.items():
        np.testing.assert_array_equal(pixels[key], want)


def test_grey_channel_is_pillows_luma(photos, tmp_path):
    root = gen.write_folder(tmp_path / "p", photos.files)
    _, pixels, *_ = read_all(root, tmp_path, image=ImageSpec("grey"))
    for key in photos.expected:
        want = np.asarray(Image.open(io.BytesIO(photos.files[key])).convert("L"))
        np.testing.assert_array_equal(pixels[key], want[None])


def test_webdataset_sample_without_image_and_bad_json(tmp_path):
    png = gen.encode(gen.draw("square", 0), "PNG")
    samples = [{"__key__": "a", "png": png, "cls": b"1"},
               {"__key__": "b", "cls": b"2"},
               {"__key__": "c", "png": png, "json": b"{not json"},
               {"__key__": "d", "png": png, "json": json.dumps([1, 2]).encode()}]
    gen.write_shards(tmp_path, samples, 1)
    _, pixels, labels, meta, report = read_all(tmp_path / "shard-000000.tar", tmp_path,
                                               format="webdataset")
    assert sorted(pixels) == ["a", "d"] and labels["a"] == "1" and meta["d"] == {"json": [1, 2]}
    reasons = {f["key"]: f["reason"] for f in report.failures}
    assert "no image" in reasons["b"] and "not valid JSON" in reasons["c"]


def test_centre_crop_without_resize_is_the_middle_columns(tmp_path):
    """A 10-high, 40-wide image to 10x10: the scale is 1, so the item is columns 15..24
    exactly (numpy slicing, no resampling involved)."""
    pixels = np.random.default_rng(5).integers(0, 256, size=(10, 40, 3), dtype=np.uint8)
    root = gen.write_folder(tmp_path / "w", {"a.png": gen.encode(pixels, "PNG")})
    _, items, labels, *_ = read_all(root, tmp_path, image=ImageSpec("rgb", (10, 10)))
    np.testing.assert_array_equal(items["a.png"], pixels[:, 15:25].transpose(2, 0, 1))
    assert labels["a.png"] is None  # at the root: no class folder


def test_units_read_apart_give_what_the_whole_gives(photos, tmp_path, monkeypatch):
    """What an ingest job does: each unit read on its own (a fresh report each, merged),
    the plan's item_shape carried over; the same items, keys and counts as source_of."""
    import ingest.batches
    import ingest.folders
    from ingest.readers import read_unit

    monkeypatch.setattr(ingest.folders, "UNIT_FILES", 5)
    monkeypatch.setattr(ingest.batches, "CHUNK_BYTES", 3 * 3 * gen.H * gen.W)  # 3 per chunk
    root = gen.write_folder(tmp_path / "p", photos.files)
    opts = IngestOptions(max_failure_share=0.5)
    plan = plan_source(resolve_location(str(root), where(tmp_path)), opts, Limits())
    assert [len(u.extra["files"]) for u in plan.units] == [5, 5, 4]  # 14 image names
    total, keys = Report(), []
    for unit in plan.units:
        report = Report()
        for chunk in read_unit(plan, unit, opts, Limits(), report):
            assert len(chunk.values) <= 3
            keys += chunk.keys
        total.merge(report.to_dict())
    assert keys == sorted(photos.expected)
    assert (total.read, total.failed, total.skipped) == (12, 2, 1)


def test_hidden_files_and_macos_folders_are_skipped(tmp_path):
    png = gen.encode(gen.draw("circle", 0), "PNG")
    files = {"c/a.png": png, "c/._a.png": b"\0\5\26\7", "__MACOSX/c/._a.png": b"junk",
             ".hidden/x.png": png}
    for uri in (gen.write_folder(tmp_path / "f", files), gen.write_zip(tmp_path / "f.zip", files),
                gen.write_tar(tmp_path / "f.tar", files)):
        _, pixels, labels, _, report = read_all(uri, tmp_path)
        assert list(pixels) == ["c/a.png"] and labels["c/a.png"] == "c"
        assert (report.failed, report.skipped) == (0, 3)


def test_a_source_with_no_readable_image_is_refused_naming_why(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no item could be read \(0 failed, 0 skipped"):
        read_all(tmp_path / "empty", tmp_path)
    root = gen.write_folder(tmp_path / "junk", {"a/x.png": b"nope", "notes.md": b"#"})
    with pytest.raises(DatasetError, match=r"\(1 failed, 1 skipped.*a/x.png: not an image"):
        read_all(root, tmp_path)


def test_bmp_webp_and_gif_by_any_case_of_extension(tmp_path):
    pixels = gen.draw("triangle", 2)
    files = {}
    for name, fmt, extra in (("a.BMP", "BMP", {}), ("b.WebP", "WEBP", {"lossless": True}),
                             ("c.gif", "GIF", {})):
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **extra)
        files[f"t/{name}"] = buf.getvalue()
    _, items, labels, _, report = read_all(gen.write_folder(tmp_path / "f", files), tmp_path)
    assert report.read == 3 and set(labels.values()) == {"t"}
    for key in ("t/a.BMP", "t/b.WebP"):  # lossless: the drawn pixels exactly
        np.testing.assert_array_equal(items[key], pixels.transpose(2, 0, 1))
    np.testing.assert_array_equal(items["t/c.gif"], gen.pillow_rgb(files["t/c.gif"]))


def test_16_bit_grey_is_rounded_to_8_bits_as_numpy_rounds(tmp_path):
    """Every 16-bit value through a PNG (mode I;16): v * 255 / 65535 rounded halves up,
    computed here in float64; a 32-bit `I` image is scaled by its own maximum."""
    from ingest.images import _to_8bit, decode_image

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"
    want = np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(buf.getvalue(), ImageSpec("grey"))[0], want)
    rgb = decode_image(buf.getvalue(), ImageSpec("rgb"))
    np.testing.assert_array_equal(rgb, np.stack([want] * 3))
    wide = np.random.default_rng(4).integers(-500, 300_000, (40, 70)).astype(np.int32)
    wide[3, 5] = 300_000  # the maximum, to 255
    got = np.asarray(_to_8bit(Image.fromarray(wide, "I")))
    want = np.clip(np.floor(wide.astype(np.float64) * 255 / 300_000 + 0.5), 0, 255)
    np.testing.assert_array_equal(got, want.astype(np.uint8))
    assert got[3, 5] == 255 and got[wide < 0].max() == 0


def test_zip_units_read_their_own_members_without_listing_the_archive(photos, tmp_path,
                                                                      monkeypatch):
    """The plan lists the zip once; each unit opens only its members (their entries come
    from the plan), so reading n units is not n listings of every member."""
    import zipfile

    import ingest.folders
    from ingest.readers import read_unit

    listings = []
    real = zipfile.ZipFile._RealGetContents
    monkeypatch.setattr(zipfile.ZipFile, "_RealGetContents",
                        lambda self: (listings.append(1), real(self))[1])
    monkeypatch.setattr(ingest.folders, "UNIT_FILES", 5)
    path = gen.write_zip(tmp_path / "p.zip", photos.files)
    opts = IngestOptions(max_failure_share=0.5)
    plan = plan_source(resolve_location(str(path), where(tmp_path)), opts, Limits())
    assert len(plan.units) == 3 and len(listings) == 1
    pixels, labels, total = {}, {}, Report()
    for unit in plan.units:
        report = Report()
        for chunk in read_unit(plan, unit, opts, Limits(), report):
            pixels.update(zip(chunk.keys, chunk.values, strict=True))
            labels.update(zip(chunk.keys, chunk.labels, strict=True))
        total.merge(report.to_dict())
    assert len(listings) == 1
    check_collection(photos, pixels, labels, total)
    assert sorted(f["key"] for f in total.failures) == sorted(photos.bad)
