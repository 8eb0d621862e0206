"""Generated images in every container the readers take, with what each key must hold
computed independently (the generated arrays for PNG, Pillow's own decode for JPEG)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {"circle": (230, 40, 40), "square": (40, 200, 60), "triangle": (50, 70, 220)}
H, W = 16, 20


def draw(cls: str, i: int, size: tuple[int, int] = (W, H)) -> np.ndarray:
    """An RGB image (H, W, 3): the class's shape in its colour, shifted by i."""
    w, h = size
    image = Image.new("RGB", size, (10 + 5 * i, 10, 20))
    d = ImageDraw.Draw(image)
    box = (2 + i % 3, 2, w - 3, h - 3)
    if cls == "circle":
        d.ellipse(box, fill=CLASSES[cls])
    elif cls == "square":
        d.rectangle(box, fill=CLASSES[cls])
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                  fill=CLASSES[cls])
    return np.asarray(image)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def pillow_rgb(data: bytes) -> np.ndarray:
    """Pillow's own decode, as (3, H, W): what a JPEG's item must equal."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).transpose(2, 0, 1)


@dataclass
class Collection:
    files: dict[str, bytes] = field(default_factory=dict)  # key -> file bytes
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # good keys -> (3, H, W)
    labels: dict[str, str] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # image-named files that must fail
    other: list[str] = field(default_factory=list)  # not images by name: skipped


def collection() -> Collection:
    """4 images per class (3 PNG, 1 JPEG), one truncated PNG, one non-image named .png,
    and a README: 12 good, 2 bad, 1 skipped."""
    c = Collection()
    for cls in CLASSES:
        for i in range(4):
            pixels = draw(cls, i)
            if i < 3:
                key, data = f"{cls}/{i:03d}.png", encode(pixels, "PNG")
                c.expected[key] = pixels.transpose(2, 0, 1)
            else:
                key, data = f"{cls}/{i:03d}.JPG", encode(pixels, "JPEG")
                c.expected[key] = pillow_rgb(data)
            c.files[key] = data
            c.labels[key] = cls
    png = encode(draw("circle", 9), "PNG")
    c.files["circle/broken.png"] = png[: len(png) // 2]
    c.files["square/fake.png"] = b"this is not an image at all"
    c.bad = ["circle/broken.png", "square/fake.png"]
    c.files["README.txt"] = b"photos"
    c.other = ["README.txt"]
    return c


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    return root


def write_zip(path: Path, files: dict[str, bytes], top: str = "photos/") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, data in reversed(files.items()):  # not sorted: the reader sorts
            zf.writestr(top + key, data)
    return path


def write_tar(path: Path, files: dict[str, bytes], gz: bool = False, top: str = "./") -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as tf:
        for key, data in files.items():
            info = tarfile.TarInfo(top + key)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def write_shards(folder: Path, samples: list[dict[str, bytes]], n_shards: int = 3) -> list[Path]:
    """`shard-000000.tar`...: each sample a dict of `<ext>` -> bytes plus `__key__`."""
    paths = []
    per = -(-len(samples) // n_shards)
    for s in range(n_shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for sample in samples[s * per:(s + 1) * per]:
                for ext, data in sample.items():
                    if ext == "__key__":
                        continue
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def wds_samples(c: Collection) -> tuple[list[dict[str, bytes]], dict[str, str]]:
    """The collection's good and bad images as WebDataset samples keyed 000000...; the
    first half labelled by .cls, the rest by .json's "label". Returns samples and
    key -> collection key."""
    samples, origin = [], {}
    for n, key in enumerate(k for k in c.files if k not in c.other):
        skey = f"{n:06d}"
        ext = key.rsplit(".", 1)[1].lower()
        sample = {"__key__": skey, ext: c.files[key]}
        cls = key.split("/")[0]
        if n % 2 == 0:
            sample["cls"] = f"{cls}\n".encode()
            sample["json"] = json.dumps({"source": key}).encode()
        else:
            sample["json"] = json.dumps({"label": cls, "source": key}).encode()
            sample["txt"] = f"a {cls}".encode()
        samples.append(sample)
        origin[skey] = key
    return samples, origin


def idx_bytes(arrays: np.ndarray | None = None, labels: np.ndarray | None = None) -> bytes:
    if arrays is not None:
        n, h, w = arrays.shape
        return struct.pack(">BBBBIII", 0, 0, 8, 3, n, h, w) + arrays.astype(np.uint8).tobytes()
    assert labels is not None
    return struct.pack(">BBBBI", 0, 0, 8, 1, len(labels)) + labels.astype(np.uint8).tobytes()
