"""An ingest job's staged units: what makes a killed attempt resume where it stopped. A unit is
written into a temporary folder and renamed into place, so a unit folder holds the whole unit
or is not there (docs/internals/ingest.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ingest.plan import Plan, Report, Unit
from store.datasets import Chunk, Source
from store.errors import DatasetError, TooLarge
from store.processes import pid_alive
from store.settings import Settings

log = logging.getLogger(__name__)
UNIT = re.compile(r"^unit-(\d{6})$")
TEMPORARY = re.compile(r"^\.unit-\d{6}-(\d+)-")  # then the writing process's pid
PLAN = "plan.json"
JOB = re.compile(r"^job-(\d+)$")


def staging_root(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "staging"


def _write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f, sort_keys=True)


class Staging:
    """The staged units of one job (docs/internals/ingest.md: staging)."""

    def __init__(self, root: Path, job_id: int, max_bytes: int | None = None) -> None:
        self.path = root / f"job-{job_id}"
        self.max_bytes = max_bytes  # float32 bytes of all items (max_inflated_bytes)

    def prepare(self, fingerprint: str) -> dict[int, dict[str, Any]]:
        """Create the folder, drop what a killed attempt left half-written, and return
        the units staged already: {index: their unit.json}.

        `fingerprint` is the plan's (`plan_fingerprint`): units staged under another plan
        (the source changed between attempts: a file added to a folder shifts every unit
        after it) are dropped, never mixed with the new plan's. A temporary folder is
        removed only when the process that was writing it is gone: a stale attempt of
        the same job may still be writing on this host."""
        self.path.mkdir(parents=True, exist_ok=True)
        plan_file = self.path / PLAN
        try:
            staged_under = json.loads(plan_file.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError):
            staged_under = None
        if staged_under != fingerprint:
            for entry in os.scandir(self.path):
                if UNIT.match(entry.name):
                    shutil.rmtree(entry.path, ignore_errors=True)
            if staged_under is not None:
                log.warning("ingest source changed since its units were staged; reading "
                            "it again path=%s", self.path)
            _write_json(str(self.path / f".{PLAN}.{os.getpid()}"), {"fingerprint": fingerprint})
            os.replace(self.path / f".{PLAN}.{os.getpid()}", plan_file)
        done: dict[int, dict[str, Any]] = {}
        for entry in os.scandir(self.path):
            match = UNIT.match(entry.name)
            if match is None:
                temporary = TEMPORARY.match(entry.name)
                if temporary and not pid_alive(int(temporary.group(1))):
                    shutil.rmtree(entry.path, ignore_errors=True)
                continue
            try:
                with open(os.path.join(entry.path, "unit.json")) as f:
                    done[int(match.group(1))] = json.load(f)
            except (OSError, ValueError):  # cannot be: units are renamed in whole
                shutil.rmtree(entry.path, ignore_errors=True)
        return done

    def write_unit(self, unit: Unit, chunks: Iterable[Chunk], report: Report,
                   values_before: int = 0) -> dict[str, Any]:
        """Stage a unit's chunks (read from `chunks` one at a time) under a temporary name,
        then rename it into place. `values_before`: float32 bytes staged by the units
        before it, so the job is refused (TooLarge) as soon as the items pass max_bytes.
        Returns the unit's record (items, bytes, report, float32 bytes of its items)."""
        tmp = self.path / f".unit-{unit.index:06d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        n_items = n_chunks = f32_bytes = 0
        keys = labels = False
        shape: list[int] | None = None
        try:
            for chunk in chunks:
                values = np.asarray(chunk.values)
                if values.dtype.hasobject or values.dtype.kind not in "biuf":
                    raise DatasetError(f"unit {unit.name}: values of dtype {values.dtype} "
                                       "are not numbers")
                f32_bytes += 4 * values.size
                if self.max_bytes is not None and values_before + f32_bytes > self.max_bytes:
                    raise TooLarge(f"the items decode to more than {self.max_bytes} bytes as "
                                   "float32 (max_inflated_bytes)")
                name = f"chunk-{n_chunks:04d}"
                np.save(tmp / f"{name}.npy", values, allow_pickle=False)
                _write_json(str(tmp / f"{name}.json"), {
                    "keys": chunk.keys, "labels": chunk.labels, "metadata": chunk.metadata})
                n_items += len(values)
                n_chunks += 1
                shape = shape or list(values.shape[1:])
                keys, labels = keys or chunk.keys is not None, labels or chunk.labels is not None
            record = {"index": unit.index, "name": unit.name, "items": n_items,
                      "chunks": n_chunks, "bytes": unit.size_bytes, "f32_bytes": f32_bytes,
                      "has_keys": keys, "has_labels": labels, "item_shape": shape,
                      "report": report.to_dict()}
            _write_json(str(tmp / "unit.json"), record)
            final = self.path / f"unit-{unit.index:06d}"
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # another attempt of the job staged this unit first (the same plan: the
                # same content); its record stands, this copy goes
                shutil.rmtree(tmp, ignore_errors=True)
                with open(final / "unit.json") as f:
                    return json.load(f)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return record

    def chunks(self, indices: Iterable[int]) -> Iterator[Chunk]:
        """The staged chunks of the units `indices`, in that order (memory-mapped)."""
        for index in indices:
            folder = self.path / f"unit-{index:06d}"
            with open(folder / "unit.json") as f:
                n_chunks = int(json.load(f)["chunks"])
            for i in range(n_chunks):
                values = np.load(folder / f"chunk-{i:04d}.npy", mmap_mode="r",
                                 allow_pickle=False)
                with open(folder / f"chunk-{i:04d}.json") as f:
                    side = json.load(f)
                yield Chunk(values, side["keys"], side["labels"], side["metadata"])

    def source(self, plan: Plan, units: dict[int, dict[str, Any]]) -> Source:
        """Every staged unit as one Source for `register_dataset`, in the plan's order."""
        order = [u.index for u in plan.units if units[u.index]["items"] > 0]
        if not order:
            raise DatasetError("the dataset is empty: no items could be read")
        first = next(self.chunks(order[:1]))
        return Source(format=plan.format, item_shape=tuple(first.values.shape[1:]),
                      dtype=str(first.values.dtype),
                      n_items=sum(units[i]["items"] for i in order),
                      chunks=self.chunks(order),
                      has_keys=any(units[i]["has_keys"] for i in order),
                      has_labels=any(units[i]["has_labels"] for i in order),
                      pixels=plan.pixels)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def plan_fingerprint(plan: Plan) -> str:
    """What identifies a plan between attempts: its format and every unit's name, bytes
    and reader's own description (a folder unit lists its files with their sizes). A
    file rewritten in place with the same name and size is not seen."""
    units = [[u.index, u.name, u.size_bytes, u.extra] for u in plan.units]
    text = json.dumps([plan.format, units], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def staged_jobs(root: Path) -> set[int]:
    """The jobs that have a staging folder under `root` now."""
    if not root.is_dir():
        return set()
    return {int(m.group(1)) for e in os.scandir(root) if (m := JOB.match(e.name))}


def sweep_staging(root: Path, live: set[int], among: set[int] | None = None) -> list[str]:
    """Remove the staging folders of jobs not in `live` (ended, or gone); with `among`,
    only of those jobs (the ones listed before `live` was asked: a folder made since, by
    a job that started meanwhile, is never taken for an ended one). Returns them."""
    removed = []
    if root.is_dir():
        for entry in os.scandir(root):
            match = JOB.match(entry.name)
            if match is None:
                continue
            job = int(match.group(1))
            if job not in live and (among is None or job in among):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.path)
    return removed
