"""Query images: a picture sent to search, encode or score, decoded exactly as the dataset's
items were and given to the model as stored 8-bit items are, so a query that is one of the
items lands on that item (docs/internals/serving.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from ingest.images import ImageError, ImageSpec, decode_image
from models.config import VAEConfig
from models.transforms import model_input
from service.api.codecs import media_type, read_body
from service.api.deps import Services, in_thread
from service.api.errors import BodyTooLarge, describe_validation
from store.datasets import get_dataset
from store.errors import Conflict, InvalidInput, UnsupportedFormat

log = logging.getLogger("latentbank.api")

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp")
MULTIPART = "multipart/form-data"
MAX_FIELD_BYTES = 64 << 10  # one form field (a filter is the longest)


def is_image_request(request: Request) -> bool:
    """Whether the body is an image (raw or in a multipart form), not JSON or .npy."""
    kind = media_type(request)
    return kind in IMAGE_TYPES or kind == MULTIPART


def image_body(fields: dict[str, Any], description: str) -> dict[str, Any]:
    """The OpenAPI request-body entries of an image: multipart (field `image` with
    `fields` beside it) and the raw image types."""
    raw = {"schema": {"type": "string", "format": "binary",
                      "description": f"the image file; {description} as query parameters"}}
    return {MULTIPART: {"schema": {
        "type": "object", "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary",
                                 "description": "a PNG, JPEG or WebP file (any format "
                                                "Pillow reads)"}, **fields}}},
        **{kind: raw for kind in IMAGE_TYPES}}


@dataclass
class Upload:
    """The image's bytes and the request's parameters: the form's fields (multipart) or
    the query string's (a raw body)."""

    data: bytes
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None


async def read_upload(request: Request, allowed: tuple[str, ...]) -> Upload:
    """The image sent with `request`; a field outside `allowed` is a 422 naming it, a
    body of another type a 415."""
    kind = media_type(request)
    if kind in IMAGE_TYPES:
        data = await read_body(request)
        fields = dict(request.query_params)
        name = None
    elif kind == MULTIPART:
        try:
            form = await request.form(max_files=1, max_fields=len(allowed) + 1,
                                      max_part_size=MAX_FIELD_BYTES)
        except BodyTooLarge:
            raise
        except Exception:  # starlette's parser: malformed multipart, too many parts
            raise InvalidInput("the multipart body is malformed (one file in field "
                               f"'image'; text fields {', '.join(allowed) or 'none'})") from None
        try:
            part = form.get("image")
            if not isinstance(part, UploadFile):
                raise InvalidInput("multipart field 'image' (the image file) is missing")
            data = await part.read()
            name = part.filename
            fields = dict(request.query_params)
            for key, value in form.multi_items():
                if key == "image":
                    continue
                if key not in allowed:
                    raise InvalidInput(f"unknown form field {key!r}; this route takes "
                                       f"{', '.join(('image', *allowed))}")
                if not isinstance(value, str):
                    raise InvalidInput(f"form field {key!r} must be text, not a file")
                fields[key] = value
        finally:
            await form.close()
    else:
        raise UnsupportedFormat(
            f"content type {kind!r} is not an image: send {', '.join(IMAGE_TYPES)} as the "
            f"body, or {MULTIPART} with the file in field 'image'")
    if not data:
        raise InvalidInput("the image is empty (0 bytes)")
    return Upload(data, fields, name)


def image_spec(svc: Services, dataset_id: int) -> ImageSpec:
    """How `dataset_id`'s items were made from images; 409 for a dataset of arrays (there
    is no transform to repeat: its items' values go as JSON or .npy). Read as searches
    read (a replica within the lag bound): a dataset's transform never changes."""
    ds = svc.reads.run(get_dataset, dataset_id)
    spec = (ds.ingest or {}).get("image")
    if not spec:
        raise Conflict(f"dataset {ds.id} was not registered from images, so there is no "
                       "image transform to apply to a query image: send the item's values "
                       "as JSON or .npy")
    try:
        return ImageSpec.from_dict(spec, max_pixels=svc.settings.max_image_pixels)
    except ImageError as exc:  # a spec written by another version
        raise Conflict(f"dataset {ds.id}'s image transform cannot be used: {exc}") from None


def image_pixels(data: bytes, spec: ImageSpec, input_shape: list[int]) -> np.ndarray:
    """The image as one uint8 item shaped (1, *input_shape); 422 with the reason when it
    cannot be read or its shape is not the model's."""
    try:
        pixels = decode_image(data, spec)
    except ImageError as exc:
        raise InvalidInput(f"the image cannot be used: {exc}") from None
    shape = tuple(int(d) for d in input_shape)
    if pixels.shape != shape:
        if pixels.shape[0] == 1 and pixels.shape[1:] == shape:  # grey (H, W) models
            return pixels.reshape(1, *shape)
        size = "" if spec.size else (" (the dataset kept each image's own size: send an "
                                     f"image of {shape[-2]}x{shape[-1]} pixels)")
        raise InvalidInput(f"the image decodes to {list(pixels.shape)} ({spec.color}); the "
                           f"model takes items of shape {list(shape)}{size}")
    return pixels[None]


async def image_input(svc: Services, upload: Upload, dataset_id: int,
                      model_config: dict[str, Any]) -> np.ndarray:
    """`upload`'s image as the values the routes take for one item (1, *input_shape):
    x / 255 in [0, 1], or the integers 0 .. 255 for a dequantising model (what a JSON item
    of the dataset would hold); the route then applies the model's transform as for JSON
    (`arrays.model_view`)."""
    spec = await in_thread(image_spec, svc, dataset_id)
    pixels = await in_thread(image_pixels, upload.data, spec, model_config["input_shape"])
    log.info("query image dataset_id=%d bytes=%d shape=%s", dataset_id, len(upload.data),
             list(pixels.shape[1:]))
    return model_input(pixels, VAEConfig.from_dict(model_config))


MAX_IMPORTANCE_SAMPLES = 5000  # as /score's query parameter
SCORE_FIELDS = ("importance_samples", "fpr", "seed")


class ScoreParams(BaseModel):
    """/score's parameters sent beside an image (form fields or query parameters), with
    the bounds of its query parameters."""

    model_config = ConfigDict(extra="forbid")

    importance_samples: int | None = Field(None, ge=0, le=MAX_IMPORTANCE_SAMPLES)
    fpr: float | None = Field(None, gt=0, le=0.5)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


def score_params(fields: dict[str, str]) -> ScoreParams:
    try:
        return ScoreParams.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput(describe_validation(list(exc.errors()))) from None
