"""Image folders, and the same layout inside a `.zip` or a `.tar`/`.tar.gz`, read in bounded
units (docs/internals/ingest.md). A folder entry whose real path leaves the allowed roots
(a symlink) is a failure, never opened."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from typing import Any

from ingest.batches import (
    MAX_IMAGE_BYTES,
    Encoded,
    image_chunks,
    is_hidden,
    label_of,
    read_bounded,
)
from ingest.images import is_image_name
from ingest.paths import inside_roots
from ingest.plan import IngestOptions, Limits, Location, Plan, Report, Unit
from ingest.tarfiles import ARCHIVE_ERRORS, member_bytes, tar_key, tar_members
from store.datasets import Chunk
from store.errors import DatasetError, TooLarge

UNIT_FILES = 4096
UNIT_BYTES = 256 << 20


# -- folders -----------------------------------------------------------------------------

def _walk_local(root: str, roots: tuple[str, ...]) -> tuple[list[list[Any]], list[str], int]:
    """Image files under `root` as [path, key, size]; keys that leave the roots; skipped.

    Links are never followed: a folder link is not descended, and only a file that is a
    link is resolved (`root` itself is resolved already, so a plain file under it lies
    inside it); one `scandir` per folder gives names, types and sizes without a `stat`
    call per file, which on a folder of small images is most of the listing."""
    files: list[list[Any]] = []
    outside: list[str] = []
    skipped = 0
    pending = [(root, "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            key = prefix + entry.name
            if entry.is_symlink():
                if roots and not inside_roots(os.path.realpath(entry.path), roots):
                    outside.append(key + ("/" if os.path.isdir(entry.path) else ""))
                    continue
                if os.path.isdir(entry.path):
                    skipped += 1  # a folder link inside the roots: not followed, counted
                    continue
            elif entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, key + "/"))
                continue
            if is_hidden(key) or not is_image_name(entry.name):
                skipped += 1
                continue
            try:
                size = entry.stat().st_size
            except OSError:
                size = 0
            files.append([entry.path, key, size])
    return files, outside, skipped


def plan_folder(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    root = location.path.rstrip("/")
    if not location.fs.isdir(root):
        raise DatasetError(f"{location.display} is not a folder (format 'images' reads a "
                           "folder of class folders; use 'zip' or 'tar' for an archive)")
    if location.is_local:
        files, outside, skipped = _walk_local(root, location.roots)
    else:
        files, outside, skipped = [], [], 0
        for path, info in sorted(location.fs.find(root, detail=True).items()):
            if info.get("type") != "file":
                continue
            key = path[len(root):].lstrip("/")
            if is_hidden(key) or not is_image_name(key):
                skipped += 1
                continue
            files.append([path, key, int(info.get("size") or 0)])
    files.sort(key=lambda f: f[1])
    if len(files) > limits.max_dataset_items:
        raise TooLarge(f"the folder holds {len(files)} images; the limit is "
                       f"{limits.max_dataset_items} (max_dataset_items)")
    units: list[Unit] = []
    start = 0
    while start < len(files) or not units:
        stop, size = start, 0
        while stop < len(files) and stop - start < UNIT_FILES and (
                size < UNIT_BYTES or stop == start):
            size += files[stop][2]
            stop += 1
        extra: dict[str, Any] = {"files": files[start:stop]}
        if not units:
            extra.update(outside=outside, skipped=skipped)
        units.append(Unit(len(units), f"{location.display}[{start}:{stop}]", size, extra))
        start = stop
        if stop >= len(files):
            break
    return Plan("images", location, units, sum(f[2] for f in files), len(files) or None,
                pixels=True)


def _report_extra(unit: Unit, report: Report) -> None:
    report.skipped += int(unit.extra.get("skipped", 0))
    for key in unit.extra.get("outside", []):
        report.fail(key, "outside the allowed roots (a link): not read")


def read_folder(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
                report: Report) -> Iterator[Chunk]:
    _report_extra(unit, report)
    fs = plan.location.fs
    opener = open if plan.location.is_local else fs.open  # fsspec's local open costs more

    def items() -> Iterator[Encoded]:
        for path, key, size in unit.extra["files"]:
            try:
                with opener(path, "rb") as f:
                    data = read_bounded(f, size, key)
            except OSError as exc:
                report.fail(key, f"cannot be read ({type(exc).__name__})")
                continue
            if isinstance(data, str):
                report.fail(key, data)
            else:
                yield Encoded(key, data, label_of(key))

    yield from image_chunks(items(), plan, report, limits.max_image_pixels)


# -- zip ---------------------------------------------------------------------------------

def _top_to_strip(names: list[str]) -> str:
    """The top folder every image shares, when the classes lie below it."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names) and any(n.count("/") >= 2
                                                               for n in names):
        return tops.pop() + "/"
    return ""


def _zip_members(zf: zipfile.ZipFile) -> tuple[list[zipfile.ZipInfo], int]:
    members, skipped = [], 0
    for info in zf.infolist():
        if info.is_dir():
            continue
        if is_hidden(info.filename) or not is_image_name(info.filename):
            skipped += 1
            continue
        members.append(info)
    members.sort(key=lambda i: i.filename)
    return members, skipped


_ZIP_FIELDS = ("orig_filename", "header_offset", "compress_type", "compress_size",
               "file_size", "CRC", "flag_bits")


class _Listed(zipfile.ZipFile):
    """A zip opened without reading its central directory: the plan read it once and gave
    each unit its members (`_ZIP_FIELDS`), so a unit costs its own members, not a parse of
    all of them (200k members in 49 units re-listed 49 times took 53 s). zipfile still
    checks each member's local header against its entry, and its CRC."""

    def _RealGetContents(self) -> None:
        pass


def _member_of(row: list[Any]) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(row[0])
    for name, value in zip(_ZIP_FIELDS[1:], row[1:], strict=True):
        setattr(info, name, value)
    return info


def _open_zip(location: Location, listed: bool = False) -> tuple[Any, zipfile.ZipFile]:
    f = location.fs.open(location.path, "rb")
    try:
        return f, (_Listed if listed else zipfile.ZipFile)(f)
    except ARCHIVE_ERRORS as exc:
        f.close()
        raise DatasetError(f"{location.display} is not a readable zip archive "
                           f"({type(exc).__name__})") from None


def plan_zip(location: Location, options: IngestOptions, limits: Limits) -> Plan:
    f, zf = _open_zip(location)
    with f, zf:
        members, skipped = _zip_members(zf)
    if len(members) > limits.max_dataset_items:
        raise TooLarge(f"the archive holds {len(members)} images; the limit is "
                       f"{limits.max_dataset_items} (max_dataset_items)")
    declared = sum(i.file_size for i in members)
    if declared > limits.max_inflated_bytes:
        raise TooLarge(f"the archive's images declare {declared} bytes inflated; the limit "
                       f"is {limits.max_inflated_bytes} (max_inflated_bytes)")
    strip = _top_to_strip([i.filename for i in members])
    units: list[Unit] = []
    start = 0
    while True:
        stop, size = start, 0
        while stop < len(members) and stop - start < UNIT_FILES and (
                size < UNIT_BYTES or stop == start):
            size += members[stop].compress_size
            stop += 1
        rows = [[getattr(i, name) for name in _ZIP_FIELDS] for i in members[start:stop]]
        extra: dict[str, Any] = {"members": rows, "strip": strip}
        if not units:
            extra["skipped"] = skipped
        units.append(Unit(len(units), f"{location.display}[{start}:{stop}]", size, extra))
        start = stop
        if stop >= len(members):
            break
    total = int(location.fs.size(location.path))
    return Plan("zip", location, units, total, len(members) or None, pixels=True)


def read_zip(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
             report: Report) -> Iterator[Chunk]:
    _report_extra(unit, report)
    strip = unit.extra["strip"]
    f, zf = _open_zip(plan.location, listed=True)

    def items() -> Iterator[Encoded]:
        for row in unit.extra["members"]:
            info = _member_of(row)
            key = info.filename[len(strip):] if info.filename.startswith(strip) else info.filename
            ratio = info.file_size / max(1, info.compress_size)
            if info.file_size > MAX_IMAGE_BYTES:
                report.fail(key, f"declares {info.file_size} bytes; the limit for one image "
                            f"is {MAX_IMAGE_BYTES}")
                continue
            if info.file_size > 1 << 20 and ratio > limits.max_compression_ratio:
                report.fail(key, f"compressed {ratio:.0f}:1, more than "
                            f"{limits.max_compression_ratio:.0f}:1 (max_compression_ratio): "
                            "not inflated")
                continue
            try:
                with zf.open(info) as member:
                    data = read_bounded(member, info.file_size, key)
            except (*ARCHIVE_ERRORS, RuntimeError, NotImplementedError) as exc:
                report.fail(key, f"the archive member is damaged or encrypted "
                            f"({type(exc).__name__})")
                continue
            if isinstance(data, str):
                report.fail(key, data)
            else:
                yield Encoded(key, data, label_of(key))

    with f, zf:
        yield from image_chunks(items(), plan, report, limits.max_image_pixels)


# -- tar ---------------------------------------------------------------------------------

def plan_tar(location: Location, options: IngestOptions, limits: Limits,
             fmt: str = "tar") -> Plan:
    size = int(location.fs.size(location.path))
    return Plan(fmt, location, [Unit(0, location.display, size, {"path": location.path})],
                size, None, pixels=True)


def read_tar(plan: Plan, unit: Unit, options: IngestOptions, limits: Limits,
             report: Report) -> Iterator[Chunk]:
    location = plan.location

    def items() -> Iterator[Encoded]:
        strip: str | None = None
        with location.fs.open(location.path, "rb") as f:
            for member, tf in tar_members(f, location.display, limits, report):
                key = tar_key(member.name)
                if is_hidden(key) or not is_image_name(key):
                    report.skipped += 1
                    continue
                if strip is None:
                    opening = getattr(tf, "opening_folder", None)
                    if opening not in (None, "./") and key.startswith(opening):
                        strip = opening
                    else:  # no folder entry first: the first image's depth decides
                        strip = key.split("/", 1)[0] + "/" if key.count("/") >= 2 else ""
                if strip and key.startswith(strip):
                    key = key[len(strip):]
                try:
                    data = member_bytes(tf, member, key)
                except ARCHIVE_ERRORS as exc:
                    raise DatasetError(f"{location.display} is truncated or damaged at "
                                       f"{key} ({type(exc).__name__})") from None
                if isinstance(data, str):
                    report.fail(key, data)
                else:
                    yield Encoded(key, data, label_of(key))

    yield from image_chunks(items(), plan, report, limits.max_image_pixels)
