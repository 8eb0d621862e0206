"""One image file's bytes to a uint8 array `(C, H, W)`, the same way everywhere.

Registration (every container: folders, archives, WebDataset shards, parquet image
columns) and the serving routes that take an image (search, encode, score by image) call
`decode_image` with the dataset's `ImageSpec`, so a query image is transformed exactly as
the dataset's items were.

The transform, in order: the first frame; EXIF orientation applied; converted to `L`
(grey) or `RGB` (an alpha channel is dropped, a palette expanded); when `size` is given,
resized so that the shorter side matches (bilinear, antialiased) and centre-cropped to
`size` exactly (torchvision's Resize + CenterCrop). Without `size` the image keeps its
own; a dataset then needs all its images the same size.

Nothing is decoded before its declared size is checked against `max_pixels` (a 100-byte
PNG can declare 10^10 pixels); JPEGs are decoded at a reduced scale where the target is
smaller (libjpeg's DCT scaling, `Image.draft`), which is most of the cost of a resize.
"""

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


def decode_image(data: bytes, spec: ImageSpec) -> np.ndarray:
    """The image in `data` as uint8 `(C, H, W)` per `spec`; ImageError (with the reason)
    when it cannot be read. Never anything else for bad bytes."""
    from PIL import Image, ImageOps

    image = _open(data, spec)
    try:
        if spec.size is not None and image.format == "JPEG":
            h, w = spec.size
            ratio = max(h / image.size[1], w / image.size[0])  # the side that must fit
            need = (math.ceil(image.size[0] * ratio), math.ceil(image.size[1] * ratio))
            image.draft("L" if spec.color == "grey" else "RGB", need)
        image.seek(0)
        image = ImageOps.exif_transpose(image) or image
        mode = "L" if spec.color == "grey" else "RGB"
        if image.mode != mode:
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey to 8 bits
                array = np.asarray(image, dtype=np.float64)
                top = 65535.0 if image.mode.startswith("I;16") else max(1.0, array.max())
                image = Image.fromarray(np.clip(array * 255.0 / top + 0.5, 0, 255)
                                        .astype(np.uint8))
            image = image.convert(mode)
        if spec.size is not None:
            h, w = spec.size
            scale = max(h / image.size[1], w / image.size[0])
            size = (max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale)))
            if size != image.size:
                image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            left, top = (image.size[0] - w) // 2, (image.size[1] - h) // 2
            image = image.crop((left, top, left + w, top + h))
        pixels = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # truncated data, a broken stream, a bad palette, ...
        raise ImageError(f"the image data is damaged ({type(exc).__name__}: "
                         f"{str(exc)[:120]})") from None
    if pixels.ndim == 2:
        return pixels[None]
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
