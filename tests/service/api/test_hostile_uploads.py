"""Hostile dataset uploads sent to the live API (`hostile_api`: its own uvicorn process with
the production-default bounds): each small file that declares or inflates to far more than
it holds is answered 413/422 naming the limit or the member, within about a second, while
the API's peak memory grows < 100 MiB and /healthz keeps answering. The figures of each
attack are printed (`pytest -s`) for the README's security section."""

import io
import struct
import zipfile

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.support import Probe

MiB = 1 << 20


def npy_header(shape, descr="<i8"):
    """A .npy header as numpy writes it, for `shape` (the data need not follow)."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buffer.getvalue()


def write_member(archive, name, header, data_bytes, method=zipfile.ZIP_DEFLATED):
    """A member `header` + `data_bytes` zero bytes, written in 1 MiB pieces (never held)."""
    info = zipfile.ZipInfo(name)
    info.compress_type = method
    zeros = bytes(MiB)
    with archive.open(info, "w", force_zip64=data_bytes > 1 << 30) as out:
        out.write(header)
        left = data_bytes
        while left:
            out.write(zeros[:min(left, MiB)])
            left -= min(left, MiB)


def small_x(archive):
    archive.writestr("x.npy", npy_header((10, 4), "<f4") + bytes(160))


def parquet_one_row(path, values=50_000_000):
    """One row holding `values` zeros: dictionary + RLE encode it in a few hundred bytes
    (np.zeros' pages are never touched, so building it costs no memory either)."""
    row = pa.ListArray.from_arrays(pa.array([0, values], pa.int32()), pa.array(np.zeros(values)))
    pq.write_table(pa.table({"v": row}), path)


def npz_inflating_labels(path, inflated=700_000_000):
    """A labels member whose header says 10 entries (as the data has) but which inflates to
    `inflated` bytes: today's reader inflated all of it, then failed to reshape (a 500)."""
    with zipfile.ZipFile(path, "w") as archive:
        small_x(archive)
        write_member(archive, "labels.npy", npy_header((10,)), inflated)


def npz_lying_file_size(path, actual=8 * MiB):
    """The zip directory says the labels member is as long as its header declares (10
    int64), but its deflate stream holds `actual` bytes: the zip's own size is a lie."""
    with zipfile.ZipFile(path, "w") as archive:
        small_x(archive)
        write_member(archive, "labels.npy", npy_header((10,)), actual)
    raw = bytearray(path.read_bytes())
    claimed = len(npy_header((10,))) + 80
    name = b"labels.npy"
    for signature, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (at := raw.find(signature, start)) >= 0:
            name_at = at + (30 if signature == b"PK\x03\x04" else 46)
            if raw[name_at:name_at + len(name)] == name:
                raw[at + size_at:at + size_at + 4] = struct.pack("<I", claimed)
            start = at + 4
    path.write_bytes(bytes(raw))


def npz_deflate_bomb(path, inflated=256 * MiB):
    """The data member: 256 MiB of float32 zeros deflated ~1000-fold."""
    with zipfile.ZipFile(path, "w") as archive:
        write_member(archive, "x.npy", npy_header((inflated // 4096, 1024), "<f4"), inflated)


def npz_bzip2(path):
    with zipfile.ZipFile(path, "w") as archive:
        write_member(archive, "x.npy", npy_header((1024, 1024), "<f4"), 4 * MiB,
                     method=zipfile.ZIP_BZIP2)


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The attack files, built once (the 700 MB member takes a few seconds to deflate)."""
    folder = tmp_path_factory.mktemp("hostile-uploads")
    parquet_one_row(folder / "one-row.parquet")
    npz_inflating_labels(folder / "labels-bomb.npz")
    npz_lying_file_size(folder / "lying-size.npz")
    npz_deflate_bomb(folder / "deflate-bomb.npz")
    npz_bzip2(folder / "bzip2.npz")
    (folder / "wide-header.csv").write_bytes(
        b",".join(b"c%d" % i for i in range(100_000)) + b"\n" + b"0," * 99_999 + b"0\n")
    (folder / "long-line.csv").write_bytes(b"a,b\n1,2\n" + b"0," * 10_000_000 + b"0\n")
    (folder / "x.npy").write_bytes(npy_bytes(np.zeros((10, 4), np.float32)))
    (folder / "huge-keys.npy").write_bytes(npy_header((10**9,), "<U64"))
    (folder / "huge-shape.npy").write_bytes(npy_header((40_000_000, 1_000_000), "<f8"))
    return folder


ATTACKS = {
    # name: (file, extra parts, status, words the message must hold)
    "parquet-one-row-50M": ("one-row.parquet", {}, 413, ["50000000", "max_item_values"]),
    "npz-labels-inflate-700MB": ("labels-bomb.npz", {}, 422, ["'labels'", "header declares"]),
    "npz-zip-size-lies": ("lying-size.npz", {}, 422, ["'labels'", "CRC"]),
    "npz-deflate-bomb-256MiB": ("deflate-bomb.npz", {}, 413, ["max_compression_ratio"]),
    "npz-bzip2-member": ("bzip2.npz", {}, 422, ["zip method 12"]),
    "npy-huge-shape": ("huge-shape.npy", {}, 422, ["[40000000, 1000000]", "holds 0 bytes"]),
    "npy-keys-claim-1e9": ("x.npy", {"keys": "huge-keys.npy"}, 422,
                           ["keys: its header declares shape [1000000000]"]),
    "csv-100k-columns": ("wide-header.csv", {}, 413, ["max_table_columns"]),
    "csv-20MB-line": ("long-line.csv", {}, 422, ["csv"]),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_upload_is_refused_in_bounded_memory(hostile_api, keys, files, attack):
    filename, extra, status, words = ATTACKS[attack]
    with httpx.Client(base_url=hostile_api.url, timeout=120,
                      headers={"Authorization": f"Bearer {keys['write']}"}) as client:
        client.get("/healthz")  # warm
        with Probe(hostile_api) as probe, open(files / filename, "rb") as data:
            parts = {"file": (filename, data)}
            for field, side in extra.items():
                parts[field] = (side, (files / side).read_bytes())
            answer = client.post("/v1/datasets", files=parts, data={"name": attack})
        print(f"\n{attack}: {(files / filename).stat().st_size} bytes -> {answer.status_code} "
              f"in {probe.elapsed:.2f} s, +{probe.grown / MiB:.0f} MiB peak, slowest "
              f"/healthz {probe.slowest_health * 1000:.0f} ms; {answer.text[:300]}")
        assert answer.status_code == status, answer.text
        message = answer.json()["error"]["message"]
        for word in words:
            assert word in message, message
        assert probe.grown < 100 * MiB
        assert probe.elapsed < 2.0
        assert probe.slowest_health < 0.5 and probe.health_failures == 0
        assert client.get("/healthz").status_code == 200
