"""WebDataset shards: `.tar` files whose members are samples, `<key>.<ext>` side by side
(`000123.jpg`, `000123.cls`, `000123.json`), one unit per shard, streamed
(docs/internals/ingest.md)."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator
from typing import Any

from ingest.batches import (
    MAX_IMAGE_BYTES,
    MAX_SIDE_BYTES,
    Encoded,
    image_chunks,
    shown_key,
)
from ingest.images import IMAGE_SUFFIXES
from ingest.paths import expand_braces, has_brace, inside_roots
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from ingest.tarfiles import ARCHIVE_ERRORS, member_bytes, tar_members
from store.datasets import Chunk
from store.errors import DatasetError, NotFound, PathNotAllowed

IMAGE_EXTS = {s[1:] for s in IMAGE_SUFFIXES}
SIDE_EXTS = ("cls", "txt", "json")


def split_key(name: str) -> tuple[str, str]:
    """`dir/000123.seg.png` -> (`dir/000123`, `seg.png`)."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def looks_like_webdataset(names: list[str]) -> bool:
    """The first members of a tar: flat `<key>.<ext>` groups of an image and a side file."""
    groups: dict[str, set[str]] = {}
    for name in names:
        key, ext = split_key(name)
        groups.setdefault(key, set()).add(ext)
    return any(exts & IMAGE_EXTS and exts & set(SIDE_EXTS) for exts in groups.values())


def shard_paths(location: Location) -> list[str]:
    fs, path = location.fs, location.path
    if has_brace(path):
        folder, name = path.rsplit("/", 1)
        paths = [f"{folder}/{n}" for n in expand_braces(name)]
        for p in paths:
            if not fs.exists(p):
                raise NotFound(f"shard {posixpath.basename(p)!r} of {location.display} "
                               "does not exist")
    elif fs.isdir(path):
        paths = sorted(p for p in fs.find(path) if p.lower().endswith(".tar"))
    else:
        paths = [path]
    if location.is_local and location.roots:
        for p in paths:
            if not inside_roots(os.path.realpath(p), location.roots):
                raise PathNotAllowed(f"shard {posixpath.basename(p)!r} is outside the "
                                     "allowed roots (a link)")
    if not paths:
        raise DatasetError(f"{location.display} holds no .tar shards")
    return paths


def plan_webdataset(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    units = []
    for i, path in enumerate(shard_paths(location)):
        size = int(location.fs.size(path))
        units.append(Unit(i, posixpath.basename(path), size, {"path": path}))
    return Plan("webdataset", location, units, sum(u.size_bytes for u in units), None,
                pixels=True)


class _Constant(ValueError):
    """NaN or Infinity in a json member: Python's json reads them, JSON has no such value."""


def _no_constant(name: str) -> Any:
    raise _Constant(name)


def _side(data: bytes, ext: str, sample: dict[str, Any]) -> None:
    """A side member into `sample`; what cannot be stored is the sample's error (one
    item's failure), never the dataset's: a NUL (PostgreSQL text takes none), NaN or
    Infinity (nor does its JSON), json nested past Python's recursion limit."""
    text = data.decode("utf-8", errors="replace")
    if "\x00" in text:
        sample["error"] = f"its {ext} member contains a NUL character"
    elif ext == "cls":
        sample["cls"] = text.strip()
    elif ext == "txt":
        sample.setdefault("metadata", {})["txt"] = text
    else:
        try:
            value = json.loads(text, parse_constant=_no_constant)
        except _Constant as exc:
            sample["error"] = f"its json member holds {exc} (not JSON)"
            return
        except RecursionError:
            sample["error"] = "its json member is nested too deeply"
            return
        except ValueError:
            sample["error"] = "its json member is not valid JSON"
            return
        meta = value if isinstance(value, dict) else {"json": value}
        sample.setdefault("metadata", {}).update(meta)


def _finish(sample: dict[str, Any], report: Report) -> Encoded | None:
    key = sample["key"]
    if "error" in sample:
        report.fail(shown_key(key), sample["error"])
        return None
    if "image" not in sample:
        report.fail(shown_key(key), "the sample has no image member ("
                    + ", ".join(sorted(IMAGE_EXTS)) + ")")
        return None
    meta = sample.get("metadata")
    label = sample.get("cls")
    if label is None and meta:
        found = meta.get("label", meta.get("cls"))
        label = None if found is None else str(found)
    return Encoded(key, sample["image"], label, meta)


def read_shard(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
               report: Report) -> Iterator[Chunk]:
    path, display = unit.extra["path"], f"shard {unit.name}"

    def items() -> Iterator[Encoded]:
        sample: dict[str, Any] | None = None
        with plan.location.fs.open(path, "rb") as f:
            for member, tf in tar_members(f, display, limits, report):
                key, ext = split_key(member.name.removeprefix("./"))
                if sample is not None and sample["key"] != key:
                    done = _finish(sample, report)
                    if done is not None:
                        yield done
                    sample = None
                if sample is None:
                    sample = {"key": key}
                last = ext.rsplit(".", 1)[-1]
                wanted = ("image" not in sample and last in IMAGE_EXTS) or ext in SIDE_EXTS
                if not wanted:
                    continue
                try:
                    data = member_bytes(tf, member, member.name, MAX_SIDE_BYTES
                                        if ext in SIDE_EXTS else MAX_IMAGE_BYTES)
                except ARCHIVE_ERRORS as exc:
                    raise DatasetError(f"{display} is truncated or damaged at {member.name} "
                                       f"({type(exc).__name__})") from None
                if isinstance(data, str):
                    sample["error"] = data
                elif ext in SIDE_EXTS:
                    _side(data, ext, sample)
                else:
                    sample["image"] = data
        if sample is not None:
            done = _finish(sample, report)
            if done is not None:
                yield done

    yield from image_chunks(items(), plan, report, limits.max_image_pixels)
