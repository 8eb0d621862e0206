"""A registration's reading options as a request gives them (JSON fields of a `uri`
body, form fields of an upload) and as an ingest job keeps them (`jobs.params`): checked
once, at the API's edge, before anything is queued, and read back by the worker with
the same function, so the two never disagree.

Every bad value is an InvalidInput (422) naming its field.
"""

from __future__ import annotations

from typing import Any

from ingest.images import COLORS, ImageError, ImageSpec, parse_size
from ingest.plan import IngestOptions
from ingest.readers import FORMATS
from store.errors import InvalidInput
from store.settings import Settings

TEXT = ("format", "array", "key_column", "label_column", "image_column")
LISTS = ("feature_columns", "metadata_columns")
FIELDS = (*TEXT, *LISTS, "image_size", "color", "max_failure_share")


def _text(field: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 200:
        raise InvalidInput(f"{field} must be text of at most 200 characters")
    return value


def _list(field: str, value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # a form field: comma-separated
        value = [c.strip() for c in value.split(",") if c.strip()]
    if (not isinstance(value, list) or len(value) > 4096
            or not all(isinstance(c, str) and 0 < len(c) <= 200 for c in value)):
        raise InvalidInput(f"{field} must be a list of column names (or comma-separated)")
    return value


def _share(value: Any, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"max_failure_share must be a number in [0, 1]; got {value!r}"
                           ) from None
    if isinstance(value, bool) or not 0.0 <= share <= 1.0:
        raise InvalidInput(f"max_failure_share must be a number in [0, 1]; got {value!r}")
    return share


def clean_options(raw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """The options of a request, checked and normalised (what an ingest job keeps):
    unknown fields, bad sizes, colours, formats and shares are refused here."""
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown option(s) {', '.join(unknown)}; the options are "
                           f"{', '.join(FIELDS)}")
    out: dict[str, Any] = {}
    for field in TEXT:
        if (value := _text(field, raw.get(field))) is not None:
            out[field] = value
    for field in LISTS:
        if (value := _list(field, raw.get(field))) is not None:
            out[field] = value
    if out.get("format") is not None and out["format"] not in FORMATS:
        raise InvalidInput(f"format {out['format']!r} is not one of {', '.join(FORMATS)}")
    try:
        size = parse_size(raw.get("image_size"))
    except ImageError as exc:
        raise InvalidInput(str(exc)) from None
    if size is not None:
        out["image_size"] = list(size)
    color = _text("color", raw.get("color"))
    if color is not None:
        if color.lower() == "gray":
            color = "grey"
        if color not in COLORS:
            raise InvalidInput(f"color must be one of {', '.join(COLORS)}; got {color!r}")
        out["color"] = color
    if size is not None:  # refused now, not after the whole source is read and staged
        channels = 1 if out.get("color") == "grey" else 3
        values = channels * size[0] * size[1]
        if values > settings.max_item_values:
            raise InvalidInput(f"image_size {size[0]}x{size[1]} with color "
                               f"{out.get('color', 'rgb')} makes items of {values} values; "
                               f"the limit is {settings.max_item_values} (max_item_values)")
    if raw.get("max_failure_share") not in (None, ""):
        out["max_failure_share"] = _share(raw["max_failure_share"],
                                          settings.ingest_max_failure_share)
    return out


def options_of(clean: dict[str, Any], settings: Settings, *, keys_path: str | None = None,
               labels_path: str | None = None) -> IngestOptions:
    """The IngestOptions of options `clean_options` returned (a job's params)."""
    image = None
    if "image_size" in clean or "color" in clean:
        image = ImageSpec(color=clean.get("color", "rgb"), size=parse_size(
            clean.get("image_size")), max_pixels=settings.max_image_pixels)
    return IngestOptions(
        format=clean.get("format"), array=clean.get("array"),
        key_column=clean.get("key_column"), label_column=clean.get("label_column"),
        feature_columns=clean.get("feature_columns"),
        metadata_columns=clean.get("metadata_columns"), keys_path=keys_path,
        labels_path=labels_path, image=image, image_column=clean.get("image_column"),
        max_failure_share=_share(clean.get("max_failure_share"),
                                 settings.ingest_max_failure_share),
        report_failures=settings.ingest_report_failures)
