"""One image file's bytes to a uint8 array `(C, H, W)`, the same way everywhere: registration
and the serving routes that take an image call `decode_image` with the dataset's
`ImageSpec`, so a query image is transformed exactly as the dataset's items were. Nothing is
decoded before its declared size is checked against `max_pixels`
(docs/internals/ingest.md)."""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
COLORS = ("grey", "rgb")
MAX_IMAGE_SIDE = 4096  # of a requested size
DEFAULT_MAX_PIXELS = 64 << 20  # declared pixels of one source image (about 8k x 8k)


class ImageError(ValueError):
    """This file is not an image that can be used: the reason, for the dataset's report."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def parse_size(value: Any) -> tuple[int, int] | None:
    """`image_size` as given: None, an int or "32" (square), "HxW", or [H, W]."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            numbers = [int(p.strip()) for p in parts]
        except ValueError:
            raise ImageError(f"image_size {value!r} must be N or HxW (integers)") from None
    elif isinstance(value, bool):
        raise ImageError(f"image_size must be N, HxW or [H, W]; got {value!r}")
    elif isinstance(value, int):
        numbers = [value]
    elif isinstance(value, list | tuple) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        numbers = list(value)
    else:
        raise ImageError(f"image_size must be N, HxW or [H, W]; got {value!r}")
    if len(numbers) == 1:
        numbers = numbers * 2
    if len(numbers) != 2 or not all(1 <= n <= MAX_IMAGE_SIDE for n in numbers):
        raise ImageError(f"image_size {value!r}: give one or two sides, each 1-{MAX_IMAGE_SIDE}")
    return numbers[0], numbers[1]


@dataclass(frozen=True)
class ImageSpec:
    """How images become items: `color` grey (1 channel) or rgb (3), and `size` (H, W)
    or None (each image's own size)."""

    color: Literal["grey", "rgb"] = "rgb"
    size: tuple[int, int] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ImageError(f"color must be one of {', '.join(COLORS)}; got {self.color!r}")
        if self.size is not None:
            object.__setattr__(self, "size", parse_size(list(self.size)))

    @property
    def channels(self) -> int:
        return 1 if self.color == "grey" else 3

    def to_dict(self) -> dict[str, Any]:
        """What a dataset records (`datasets.ingest["image"]`): enough to decode a query
        image as the items were."""
        return {"color": self.color, "size": list(self.size) if self.size else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS,
                  ) -> ImageSpec:
        return cls(color=data.get("color", "rgb"), size=parse_size(data.get("size")),
                   max_pixels=max_pixels)


def _open(data: bytes, spec: ImageSpec) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"the image declares too many pixels ({str(exc)[:80]}); the limit "
                         f"is {spec.max_pixels} (max_image_pixels)") from None
    except UnidentifiedImageError:
        raise ImageError("not an image Pillow can read (unknown or damaged format)") from None
    except Exception as exc:  # a malformed header can raise anything
        raise ImageError(f"unreadable image header ({type(exc).__name__})") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"the image declares {width}x{height} pixels")
    if width * height > spec.max_pixels:
        raise ImageError(f"the image declares {width}x{height} pixels; the limit is "
                         f"{spec.max_pixels} (max_image_pixels)")
    return image


def centre_box(width: int, height: int, size: tuple[int, int],
               ) -> tuple[float, float, float, float]:
    """The largest box of `size`'s aspect ratio (H, W) centred in a `width` x `height`
    image, as Pillow's (left, top, right, bottom); fractional, so that the centring is
    exact rather than off by a rounded pixel."""
    h, w = size
    if width * h > height * w:  # wider than the target: full height, the middle columns
        bw, bh = height * w / h, float(height)
    else:
        bw, bh = float(width), width * h / w
    left, top = (width - bw) / 2, (height - bh) / 2
    return left, top, left + bw, top + bh


ROUND_BLOCK_PIXELS = 1 << 20  # 16-bit grey is mapped to 8 bits this many pixels at a time

_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _to_8bit(image: Any) -> Any:
    """16-bit (`I;16*`) or 32-bit (`I`) grey to `L`: `v * 255 / top` rounded halves up,
    computed in integers as `(510 v + top) // (2 top)` clipped to 0..255, a block of rows
    at a time (an 8000x8000 image in float64 would be 512 MB per temporary). `top` is
    65535 for 16 bits, else the image's maximum (from `getextrema`, no copy). Rounding
    rather than `v >> 8` keeps the mapping the datasets already registered were made with
    (65535 -> 255, 257 k -> k exactly), so query images still decode as their items."""
    from PIL import Image

    width, height = image.size
    top = 65535 if image.mode.startswith("I;16") else max(1, int(image.getextrema()[1]))
    out = np.empty((height, width), dtype=np.uint8)
    rows = max(1, ROUND_BLOCK_PIXELS // width)
    for y in range(0, height, rows):
        block = np.asarray(image.crop((0, y, width, min(height, y + rows))), dtype=np.int64)
        block *= 510
        block += top
        block //= 2 * top
        np.clip(block, 0, 255, out=block)
        out[y:y + rows] = block
    return Image.fromarray(out)


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """The image in `data` as uint8 `(C, H, W)` per `spec`; ImageError (with the reason)
    when it cannot be read. Never anything else for bad bytes."""
    from PIL import Image, ImageOps

    image = _open(data, spec)
    try:
        if spec.size is not None and image.format == "JPEG":
            # the whole image at a scale where its centre box still covers the target
            # (in the file's orientation, before EXIF turns it)
            h, w = spec.size
            if image.getexif().get(0x0112) in _TRANSPOSED:
                h, w = w, h
            sw, sh = image.size
            left, top, right, bottom = centre_box(sw, sh, (h, w))
            need = (math.ceil(sw * w / (right - left)), math.ceil(sh * h / (bottom - top)))
            image.draft("L" if spec.color == "grey" else "RGB", need)
        image.seek(0)
        image = ImageOps.exif_transpose(image) or image
        mode = "L" if spec.color == "grey" else "RGB"
        if image.mode != mode:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey to 8 bits
                image = _to_8bit(image)
            image = image.convert(mode)
        if spec.size is not None:
            h, w = spec.size
            box = centre_box(image.size[0], image.size[1], (h, w))
            if (w, h) != image.size:
                image = image.resize((w, h), Image.Resampling.BILINEAR, box=box,
                                     reducing_gap=3.0)
        pixels = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # truncated data, a broken stream, a bad palette, ...
        raise ImageError(f"the image data is damaged ({type(exc).__name__}: "
                         f"{str(exc)[:120]})") from None
    if pixels.ndim == 2:
        return pixels[None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
