"""The artifact store: keys confined to the root, checksummed round trips, and downloads
into a shared cache folder."""

import concurrent.futures
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from store.artifacts import ArtifactStore, check_key
from store.errors import NotFound, PathNotAllowed


def npy_bytes(array):
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_a_new_download_never_truncates_a_mapped_copy(artifacts, tmp_path):
    old = np.arange(1 << 18, dtype=np.float32)  # 1 MiB
    artifacts.put_bytes(npy_bytes(old), "data/x.npy")
    local = str(tmp_path / "x.npy")
    artifacts.get_file("data/x.npy", local)
    mapped = np.load(local, mmap_mode="r", allow_pickle=False)  # another process's view
    artifacts.put_bytes(npy_bytes(np.ones(16, np.float32)), "data/x.npy")  # smaller now
    artifacts.get_file("data/x.npy", local)
    # In-place overwriting would cut the file under the mapping (SIGBUS on reading it).
    np.testing.assert_array_equal(mapped, old)
    np.testing.assert_array_equal(np.load(local, allow_pickle=False), np.ones(16))


def test_a_checksum_mismatch_leaves_nothing_behind(artifacts, tmp_path):
    artifacts.put_bytes(b"payload", "f.bin")
    (tmp_path / "cache").mkdir()
    local = tmp_path / "cache" / "f.bin"
    local.write_bytes(b"the previous good copy")
    with pytest.raises(OSError, match="does not match its recorded sha256"):
        artifacts.get_file("f.bin", str(local), sha256="0" * 64)
    assert local.read_bytes() == b"the previous good copy"
    assert os.listdir(tmp_path / "cache") == ["f.bin"]


def test_concurrent_downloads_of_one_file_each_leave_it_whole(artifacts, tmp_path):
    payload = os.urandom(4 << 20)
    artifacts.put_bytes(payload, "big.bin")
    (tmp_path / "cache").mkdir()
    local = str(tmp_path / "cache" / "big.bin")
    digest = hashlib.sha256(payload).hexdigest()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: artifacts.get_file("big.bin", local, sha256=digest),
                      range(16)))
    assert hashlib.sha256(Path(local).read_bytes()).hexdigest() == digest
    assert os.listdir(tmp_path / "cache") == ["big.bin"]


@pytest.mark.parametrize("key", ["../x", "/etc/passwd", "a/../../b", "a//b", "", "a\\b",
                                 "a/./b", "x" * 600, "ünïcode"])
def test_artifact_keys_are_confined(key, tmp_path):
    with pytest.raises(PathNotAllowed):
        check_key(key)
    store = ArtifactStore(tmp_path.as_uri())
    with pytest.raises(PathNotAllowed):
        store.put_bytes(b"x", key)


def test_artifact_round_trip_with_checksum(tmp_path):
    store = ArtifactStore((tmp_path / "root").as_uri())
    digest = store.put_bytes(b"hello", "models/1/encoder.onnx")
    assert store.exists("models/1/encoder.onnx") and store.size("models/1/encoder.onnx") == 5
    out = tmp_path / "out.bin"
    store.get_file("models/1/encoder.onnx", str(out), sha256=digest)
    assert out.read_bytes() == b"hello"
    with pytest.raises(OSError, match="does not match its recorded sha256"):
        store.get_file("models/1/encoder.onnx", str(out), sha256="0" * 64)
    with pytest.raises(NotFound):
        store.size("models/2/encoder.onnx")
    store.delete("models/1")
    assert not store.exists("models/1/encoder.onnx")
