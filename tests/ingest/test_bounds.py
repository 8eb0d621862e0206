"""What a source declares is checked before it costs memory or work, and user paths stay
inside the allowed roots and URL prefixes."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.paths import brace_count, expand_braces, resolve_location
from ingest.plan import IngestOptions, Limits
from store.errors import DatasetError, NotFound, PathNotAllowed, TooLarge
from tests.ingest import data as gen
from tests.ingest.test_images import read_all, where


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a tiny IDAT (CRCs valid)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_png_declaring_a_billion_pixels_is_a_failure_without_allocating(tmp_path):
    files = {"a/ok.png": gen.encode(gen.draw("circle", 0), "PNG"),
             "a/bomb.png": png_declaring(40_000, 25_000)}
    root = gen.write_folder(tmp_path / "p", files)
    tracemalloc.start()
    _, pixels, _, _, report = read_all(root, tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert list(pixels) == ["a/ok.png"]
    assert report.failures[0]["key"] == "a/bomb.png"
    reason = report.failures[0]["reason"]
    assert "1000000000 pixels" in reason and "max_image_pixels" in reason
    assert peak < 16 << 20  # 10^9 RGB pixels would be 3 GB


def test_zip_member_with_a_huge_ratio_is_refused_before_inflating(tmp_path):
    path = tmp_path / "z.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/ok.png", gen.encode(gen.draw("square", 0), "PNG"))
        zf.writestr("a/zeros.png", b"\0" * (40 << 20))
    info = zipfile.ZipFile(path).getinfo("a/zeros.png")
    assert info.file_size / info.compress_size > 200  # the premise
    tracemalloc.start()
    _, pixels, _, _, report = read_all(path, tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert list(pixels) == ["a/ok.png"]
    assert report.failures[0]["key"] == "a/zeros.png"
    assert "max_compression_ratio" in report.failures[0]["reason"]
    assert peak < 8 << 20  # 40 MiB were never inflated


def test_zip_declaring_more_than_max_inflated_bytes_is_refused_at_plan(tmp_path):
    path = gen.write_zip(tmp_path / "z.zip", gen.collection().files)
    from ingest.readers import plan_source

    with pytest.raises(TooLarge, match="max_inflated_bytes"):
        plan_source(resolve_location(str(path), where(tmp_path)), IngestOptions(),
                    Limits(max_inflated_bytes=1000))


def test_tar_inflating_past_the_limit_is_refused(tmp_path):
    path = gen.write_tar(tmp_path / "t.tar.gz", gen.collection().files, gz=True)
    from ingest.plan import Report
    from ingest.readers import plan_source, source_of

    opts = IngestOptions(max_failure_share=0.5)
    plan = plan_source(resolve_location(str(path), where(tmp_path)), opts, Limits())
    with pytest.raises(TooLarge, match="max_inflated_bytes"):
        list(source_of(plan, opts, Limits(max_inflated_bytes=2000), Report()).chunks)


def test_truncated_tar_fails_with_a_clear_error(tmp_path):
    path = gen.write_tar(tmp_path / "t.tar", gen.collection().files)
    data = path.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(DatasetError, match="cut.tar is truncated or damaged"):
        read_all(tmp_path / "cut.tar", tmp_path)


def test_parquet_row_group_larger_than_the_bound_is_refused_at_plan(tmp_path, monkeypatch):
    import ingest.imageparquet

    pngs = [gen.encode(gen.draw("circle", i, (20 + i, 16)), "PNG") for i in range(20)]
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary())}), tmp_path / "p.parquet",
                   compression="none")
    monkeypatch.setattr(ingest.imageparquet, "MAX_ROW_GROUP_BYTES", sum(map(len, pngs[:10])))
    with pytest.raises(TooLarge, match="row group 0"):
        read_all(tmp_path / "p.parquet", tmp_path)


def test_brace_patterns_are_counted_before_they_are_expanded(tmp_path):
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert brace_count("x-{0..9999}-{0..9999}") == 10**8
    tracemalloc.start()
    for name in ("s-{0000000..9999999}.tar", "x-{0..9999}-{0..999}.tar"):
        with pytest.raises(PathNotAllowed, match="names 10000000 files"):
            resolve_location(str(tmp_path / name), where(tmp_path))
    assert tracemalloc.get_traced_memory()[1] < 1 << 20
    tracemalloc.stop()
    gen.write_shards(tmp_path, [{"__key__": "a", "cls": b"1"}], 1)
    with pytest.raises(NotFound, match="shard-000001.tar"):
        read_all(tmp_path / "shard-{000000..000001}.tar", tmp_path)


def test_paths_stay_inside_the_roots(tmp_path):
    root = tmp_path / "allowed"
    photos = gen.write_folder(root / "photos", {"a/ok.png": gen.encode(gen.draw("circle", 0),
                                                                        "PNG")})
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "s.png").write_bytes(gen.encode(gen.draw("square", 0), "PNG"))
    os.symlink(tmp_path / "secret" / "s.png", photos / "a" / "link.png")
    os.symlink(tmp_path / "secret", photos / "linked-dir")
    _, pixels, _, _, report = read_all(photos, root, max_failure_share=0.9)
    assert list(pixels) == ["a/ok.png"]
    assert sorted(f["key"] for f in report.failures) == ["a/link.png", "linked-dir/"]
    assert all("outside the allowed roots" in f["reason"] for f in report.failures)
    settings = where(root)
    assert resolve_location((photos / "a" / "ok.png").as_uri(), settings).path == str(
        (photos / "a" / "ok.png").resolve())
    for uri in (str(root / ".." / "secret"), str(photos / "a" / "link.png"), "/etc",
                str(root / "photos/{a,b}/x.png")):
        with pytest.raises(PathNotAllowed):
            resolve_location(uri, settings)
    with pytest.raises(NotFound):
        resolve_location(str(root / "missing"), settings)
    with pytest.raises(PathNotAllowed, match="NUL"):
        resolve_location(str(root) + "/a\x00b", settings)
    urls = SimpleNamespace(allowed_roots=[], allowed_urls=["s3://bucket/photos/"],
                           source_options={})
    for url in ("s3://bucket/other/x.png", "s3://bucket/photos/../other/",
                "s3://bucket/photosx/", "gs://bucket/photos/a"):
        with pytest.raises(PathNotAllowed):
            resolve_location(url, urls)


def test_non_regular_tar_members_are_skipped(tmp_path):
    path = tmp_path / "t.tar"
    png = gen.encode(gen.draw("circle", 0), "PNG")
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("c/a.png")
        info.size = len(png)
        tf.addfile(info, io.BytesIO(png))
        link = tarfile.TarInfo("c/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    _, pixels, _, _, report = read_all(path, tmp_path)
    assert list(pixels) == ["c/a.png"] and report.skipped == 1 and report.failed == 0
    np.testing.assert_array_equal(pixels["c/a.png"], gen.draw("circle", 0).transpose(2, 0, 1))


def test_an_allowed_url_that_cannot_be_opened_is_a_clear_error():
    from store.errors import UnsupportedFormat

    settings = SimpleNamespace(allowed_roots=[], allowed_urls=["nosuchfs://b/p/"],
                               source_options={})
    with pytest.raises(UnsupportedFormat, match="Protocol not known: nosuchfs"):
        resolve_location("nosuchfs://b/p/x.tar", settings)


def _decode_in_child(tmp_path, data: bytes, color: str, size) -> tuple[np.ndarray, float]:
    """`decode_image` in a fresh interpreter: (pixels, MiB its peak RSS grew by during the
    decode). A child, because Pillow's buffers are not seen by tracemalloc and this
    process's peak is already set by whatever ran before."""
    import json
    import subprocess
    import sys

    (tmp_path / "in.bin").write_bytes(data)
    script = f"""
import io, json, resource, numpy as np
from PIL import Image
from ingest.images import ImageSpec, decode_image
data = open({str(tmp_path / "in.bin")!r}, "rb").read()
buf = io.BytesIO(); Image.new("RGB", (4, 4)).save(buf, "PNG")
decode_image(buf.getvalue(), ImageSpec({color!r}, (4, 4)))  # plugins and numpy warmed up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
pixels = decode_image(data, ImageSpec({color!r}, {size!r}))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.save({str(tmp_path / "out.npy")!r}, pixels)
print(json.dumps((after - before) / 1024))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return np.load(tmp_path / "out.npy"), json.loads(out.stdout.strip().splitlines()[-1])


def test_a_thin_image_resizes_only_its_centre(tmp_path):
    """A 200000x1 PNG (under 1 KB) to 64x64: the old resize-then-crop made it 12.8M x 64
    pixels (3.6 GB) first. Only the centre box (one source pixel wide) is resampled now;
    the item equals Pillow's resize of that box, and numpy's view of it: every row the
    same, going from the left half's red (200) to the right half's (40)."""
    from PIL import Image

    source = np.zeros((1, 200_000, 3), np.uint8)
    source[0, :100_000, 0], source[0, 100_000:, 0] = 200, 40
    source[0, :, 1] = 7
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, "PNG")
    assert len(buf.getvalue()) < 4096  # the premise: a tiny file
    pixels, grew = _decode_in_child(tmp_path, buf.getvalue(), "rgb", (64, 64))
    assert grew < 50  # MiB; 3.6 GB before
    want = Image.fromarray(source).resize((64, 64), Image.Resampling.BILINEAR,
                                          box=(99_999.5, 0, 100_000.5, 1), reducing_gap=3.0)
    np.testing.assert_array_equal(pixels, np.asarray(want).transpose(2, 0, 1))
    red = pixels[0].astype(int)
    assert (red == red[0]).all() and (pixels[1] == 7).all() and (pixels[2] == 0).all()
    assert red[0, 0] > 150 and red[0, -1] < 90 and (np.diff(red[0]) <= 0).all()


def test_a_large_16_bit_png_is_mapped_in_integers(tmp_path):
    """A 6000x6000 16-bit PNG (36M pixels): Pillow holds it at 2 bytes a pixel and the
    item is 1; the float64 mapping added 8 bytes a pixel per temporary (over 1 GB here).
    The peak stays under 5 bytes a pixel, and the values are numpy's rounding of
    v * 255 / 65535."""
    from PIL import Image

    side = 6000
    source = np.zeros((side, side), np.uint16)
    source[:7, :9] = np.arange(63, dtype=np.uint16).reshape(7, 9) * 1040
    source[-1, -5:] = [128, 129, 385, 386, 65535]
    buf = io.BytesIO()
    Image.fromarray(source).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode == "I;16"  # the premise
    pixels, grew = _decode_in_child(tmp_path, buf.getvalue(), "grey", None)
    assert grew < 5 * side * side / (1 << 20)
    want = np.floor(source[:7, :9].astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(pixels[0, :7, :9], want)
    np.testing.assert_array_equal(pixels[0, -1, -5:], [0, 1, 1, 2, 255])
    assert pixels.shape == (1, side, side) and int(pixels.sum()) == int(want.sum()) + 259


def _long_name_bomb(path, declared: int, gz: bool = True) -> None:
    """A GNU long-name header declaring `declared` bytes of name (`c/aaa...a.png`,
    compressing to almost nothing), then a small PNG member that the name is for: the
    reviewer's 400 KB .tar.gz that took 888 MiB to open."""
    import gzip

    png = gen.encode(gen.draw("circle", 0), "PNG")
    long_name = tarfile.TarInfo("././@LongLink")
    long_name.size, long_name.type = declared, tarfile.GNUTYPE_LONGNAME
    member = tarfile.TarInfo("c/x.png")
    member.size = len(png)
    name = b"c/" + b"a" * (declared - 7) + b".png\0"
    body = (long_name.tobuf(format=tarfile.USTAR_FORMAT) + name + b"\0" * (-declared % 512)
            + member.tobuf(format=tarfile.USTAR_FORMAT) + png + b"\0" * (-len(png) % 512)
            + b"\0" * 1024)
    path.write_bytes(gzip.compress(body, 9) if gz else body)


@pytest.mark.parametrize("fmt", ["tar", "webdataset"])
def test_a_huge_tar_long_name_is_refused_before_it_is_read(tmp_path, fmt):
    from ingest.plan import Report
    from ingest.readers import plan_source, source_of

    path = tmp_path / "bomb.tar.gz"
    _long_name_bomb(path, 32 << 20)
    assert path.stat().st_size < 100 << 10  # the premise: 32 MiB of name in a small file
    opts = IngestOptions(format=fmt, max_failure_share=0.5)
    plan = plan_source(resolve_location(str(path), where(tmp_path)), opts, Limits())
    tracemalloc.start()
    with pytest.raises(TooLarge) as err:
        list(source_of(plan, opts, Limits(), Report()).chunks)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert f"a tar header of {32 << 20} bytes" in str(err.value)
    assert "bomb.tar.gz" in str(err.value) and "limit is 1048576" in str(err.value)
    assert peak < 4 << 20  # the 32 MiB name was never read


def test_a_tar_bomb_is_refused_while_the_format_is_being_told(tmp_path):
    """No format given: the first members are peeked at to tell WebDataset from class
    folders, through the same checked reader (a plain tarfile took 888 MiB here)."""
    from ingest.readers import plan_source

    path = tmp_path / "bomb.tar.gz"
    _long_name_bomb(path, 32 << 20)
    tracemalloc.start()
    with pytest.raises(DatasetError) as err:
        plan_source(resolve_location(str(path), where(tmp_path)), IngestOptions(), Limits())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "bomb.tar.gz" in str(err.value) and peak < 4 << 20


def test_a_tar_that_opens_with_its_folder_gives_the_folders_keys(tmp_path):
    """`tar cf photos.tar photos/` (and the CLI's packed folder) opens with the folder's
    entry: dropped, whatever the depth of the first image (one at the root: no label)."""
    png = gen.encode(gen.draw("square", 1), "PNG")
    with tarfile.open(tmp_path / "photos.tar", "w") as tf:
        tf.addfile(_folder_entry("photos"))
        for key in ("photos/a.png", "photos/cat/2020/1.png", "photos/dog/2.png"):
            info = tarfile.TarInfo(key)
            info.size = len(png)
            tf.addfile(info, io.BytesIO(png))
    _, pixels, labels, _, report = read_all(tmp_path / "photos.tar", tmp_path, format="tar")
    assert sorted(pixels) == ["a.png", "cat/2020/1.png", "dog/2.png"] and report.failed == 0
    assert labels == {"a.png": None, "cat/2020/1.png": "cat", "dog/2.png": "dog"}


def _folder_entry(name):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def test_long_names_within_the_bound_still_read_and_count_as_inflated(tmp_path):
    """pax and GNU long names (over tar's 100 characters) read as before; their records
    count into max_inflated_bytes like member data."""
    from ingest.plan import Report
    from ingest.readers import plan_source, read_unit, source_of

    long = "c/" + "n" * 150 + ".png"
    png = gen.encode(gen.draw("square", 1), "PNG")
    for tar_format, name in ((tarfile.PAX_FORMAT, "pax.tar"), (tarfile.GNU_FORMAT, "gnu.tar")):
        with tarfile.open(tmp_path / name, "w", format=tar_format) as tf:
            for key in (long, "c/short.png"):
                info = tarfile.TarInfo(key)
                info.size = len(png)
                tf.addfile(info, io.BytesIO(png))
        _, pixels, labels, _, report = read_all(tmp_path / name, tmp_path, format="tar")
        assert sorted(pixels) == sorted([long, "c/short.png"]) and report.failed == 0
        assert set(labels.values()) == {"c"}
        np.testing.assert_array_equal(pixels[long], gen.draw("square", 1).transpose(2, 0, 1))
    bomb = tmp_path / "b.tar"
    _long_name_bomb(bomb, 1000 << 10, gz=False)  # under the 1 MiB cap: read, then counted
    opts = IngestOptions(format="tar")
    plan = plan_source(resolve_location(str(bomb), where(tmp_path)), opts, Limits())
    with pytest.raises(TooLarge, match="max_inflated_bytes"):
        list(source_of(plan, opts, Limits(max_inflated_bytes=900 << 10), Report()).chunks)
    report = Report()  # read under the cap, then the 1000 KB key is one item's failure
    assert list(read_unit(plan, plan.units[0], opts, Limits(), report)) == []
    assert report.failures == [{"key": "c/" + "a" * 197 + "…", "reason": (
        f"its key is {(1000 << 10) - 1} characters; the limit is 1000")}]


def test_gnu_sparse_tar_members_are_refused(tmp_path):
    path = tmp_path / "s.tar"
    sparse = tarfile.TarInfo("c/s.png")
    sparse.type = tarfile.GNUTYPE_SPARSE
    path.write_bytes(sparse.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 1024)
    with pytest.raises(DatasetError, match="sparse members are not read"):
        read_all(path, tmp_path, format="tar")


def test_parquet_row_groups_count_every_column_read(tmp_path, monkeypatch):
    """A label column is bytes read like the images: with label_column the row group is
    over the bound, without it (the labels never read) it is not."""
    import ingest.imageparquet
    from ingest.readers import plan_source

    pngs = [gen.encode(gen.draw("circle", i), "PNG") for i in range(4)]
    labels = [f"{i}" + "x" * 5000 for i in range(4)]  # distinct: stored plain, 20 KB
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "label": labels}),
                   tmp_path / "p.parquet", compression="none", use_dictionary=False)
    group = pq.ParquetFile(tmp_path / "p.parquet").metadata.row_group(0)
    image, label = (group.column(j).total_uncompressed_size for j in range(2))
    assert label > 4 * 5000 > image  # the premise
    monkeypatch.setattr(ingest.imageparquet, "MAX_ROW_GROUP_BYTES", image + label - 1)
    location = resolve_location(str(tmp_path / "p.parquet"), where(tmp_path))
    with pytest.raises(TooLarge, match=rf"holds {image + label} bytes in the columns read "
                                       r"\(image, label\)"):
        plan_source(location, IngestOptions(label_column="label"), Limits())
    plan = plan_source(location, IngestOptions(), Limits())
    assert [u.size_bytes for u in plan.units] == [image]


@pytest.mark.slow
def test_a_label_repeated_by_parquet_s_dictionary_is_not_expanded(tmp_path):
    """16 rows sharing one 8 MiB label: zstd and parquet's dictionary make it a few KB of
    file declaring 8 MiB; read as plain strings it was 128 MiB in Arrow (the reviewer's
    64 MiB x 8 took 1.7 GB). Read as a dictionary, Arrow's peak stays near the one label,
    and each row is a failure naming the label's size; the 2 rows with short labels read."""
    import json
    import subprocess
    import sys

    pngs = [gen.encode(gen.draw("square", i), "PNG") for i in range(18)]
    labels = ["L" * (8 << 20)] * 16 + ["a", "b"]
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary()), "label": labels}),
                   tmp_path / "d.parquet", compression="zstd")
    assert (tmp_path / "d.parquet").stat().st_size < 64 << 10  # the premise
    script = f"""
import json, fsspec, pyarrow as pa
from ingest.plan import IngestOptions, Limits, Location, Report
from ingest.readers import plan_source, read_unit
loc = Location(fsspec.filesystem("file"), {str(tmp_path / "d.parquet")!r}, "d.parquet")
opts = IngestOptions(label_column="label")
plan = plan_source(loc, opts, Limits())
report, labels = Report(), []
for unit in plan.units:
    for chunk in read_unit(plan, unit, opts, Limits(), report):
        labels += chunk.labels
print(json.dumps([pa.default_memory_pool().max_memory(), labels, report.to_dict()]))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    peak, labels, report = json.loads(out.stdout.strip().splitlines()[-1])
    assert labels == ["a", "b"] and report["read"] == 2 and report["failed"] == 16
    for failure in report["failures"]:
        size = int(failure["reason"].split(" bytes;")[0].rsplit(" ", 1)[1])
        assert 8 << 20 <= size <= (8 << 20) + 16  # the label and its Arrow offsets
    assert peak < 64 << 20  # expanded and read as Python strings: 272 MiB
