"""The ingest job: read a source unit by unit into the job's staging folder (a killed
attempt resumes after the last staged unit), then register the dataset from it in one
transaction (docs/internals/ingest.md)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ingest.npy_folder import FORMAT as NPY_FOLDER
from ingest.npy_folder import plan_npy_folder, read_npy_unit
from ingest.paths import resolve_location
from ingest.plan import (
    IngestOptions,
    Limits,
    Location,
    Plan,
    Report,
    Unit,
    ingest_record,
)
from ingest.readers import plan_source, read_unit, refuse_failures
from ingest.requests import options_of
from ingest.staging import (
    Staging,
    plan_fingerprint,
    staged_jobs,
    staging_root,
    sweep_staging,
)
from store.artifacts import check_key
from store.datasets import Chunk, Registered, register_dataset
from store.db import is_transient
from store.errors import Conflict, DatasetError, StoreError
from store.jobs import LeaseLost, finish, ingest_progress, unfinished
from workers.context import Context
from workers.lease import Lease, start_attempt
from workers.outages import end_for, retry_while_leased

log = logging.getLogger(__name__)
ENDED = ("terminal", "cancelled", "exhausted")  # claims that find the job over


class IngestCancelled(Exception):
    pass


def _uploaded(ctx: Context, params: dict[str, Any], staging: Staging,
              ) -> tuple[Location, dict[str, str]]:
    """An upload saved for the job in the artifact store: its Location (read in place,
    local or not) and its keys/labels parts as local files (the .npy reader's)."""
    key = check_key(params["upload_key"])
    if not key.startswith("uploads/") or not ctx.artifacts.exists(key):
        raise DatasetError("the upload saved for this job is gone (the job ended, or its "
                           "files were removed)")
    side = {}
    for part in ("keys", "labels"):
        if params.get(f"{part}_key"):
            part_key = check_key(params[f"{part}_key"])
            local = ctx.artifacts.local_path(part_key) or ctx.artifacts.get_file(
                part_key, str(staging.path / f"{part}.npy"))
            side[f"{part}_path"] = local
    display = params.get("filename") or key.rsplit("/", 1)[-1]
    return Location(ctx.artifacts.fs, ctx.artifacts.path(key), display), side


def cleanup(ctx: Context, job_id: int, params: dict[str, Any] | None) -> None:
    """What the job leaves behind once it has ended: its staging folder and upload."""
    Staging(staging_root(ctx.settings), job_id).remove()
    folder = (params or {}).get("upload_folder")
    if folder and check_key(folder).startswith("uploads/"):
        ctx.artifacts.delete(folder)


def sweep_ended(ctx: Context) -> list[str]:
    """Remove this host's staging folders of ingest jobs that have ended (or are gone):
    a job requeued onto another host and finished there leaves its first host's folder.
    Best effort: a failure here never stops the job that is starting."""
    try:
        root = staging_root(ctx.settings)
        listed = staged_jobs(root)  # before the query: an ended job never starts again
        if not listed:
            return []
        removed = sweep_staging(root, unfinished(ctx.db, listed), among=listed)
    except Exception:
        log.warning("could not sweep the staging folders", exc_info=True)
        return []
    for path in removed:
        log.info("removed the staging of an ended ingest job path=%s", path)
    return removed


def run_ingest_job(ctx: Context, job_id: int) -> dict[str, Any]:
    settings = ctx.settings
    sweep_ended(ctx)
    owner, got = start_attempt(ctx.db, job_id, settings.ingest_lease_seconds)
    if got.outcome != "claimed":
        if got.outcome in ENDED and got.job is not None:
            cleanup(ctx, job_id, got.job.params)
        return {"outcome": got.outcome}
    job = got.job
    assert job is not None
    log.info("ingest started job_id=%d attempt=%d", job_id, job.attempts)
    with Lease(ctx.db, job_id, owner, settings.ingest_lease_seconds) as lease:
        try:
            result = _ingest(ctx, job_id, job.params, lease)
        except LeaseLost:
            log.warning("ingest attempt lost its lease job_id=%d owner=%s", job_id, owner)
            return {"outcome": "lease_lost"}  # the staging is the next attempt's
        except IngestCancelled:
            if lease.lost:
                return {"outcome": "lease_lost"}
            try:
                finish(ctx.db, job_id, owner, "cancelled",
                       message="cancelled; nothing was registered")
            except LeaseLost:
                return {"outcome": "lease_lost"}
            result = {"outcome": "cancelled"}
        except Exception as exc:
            if is_transient(exc):  # the staged units stay for the next attempt
                return end_for(ctx, job_id, owner, exc)
            own = isinstance(exc, StoreError)  # a refused source: its message says it all
            if not own:
                log.exception("ingest failed job_id=%d", job_id)
            result = end_for(ctx, job_id, owner, exc, str(exc) if own else None)
    if result["outcome"] in ("succeeded", "failed", "cancelled"):
        cleanup(ctx, job_id, job.params)
    log.info("ingest ended job_id=%d outcome=%s", job_id, result["outcome"])
    return result


def _watched(chunks: Iterator[Chunk], unit: Unit, report: Report, lease: Lease,
             progress: Callable[[int, int], None]) -> Iterator[Chunk]:
    """A unit's chunks, with the job's progress inside the unit (items, and the source
    bytes its reader counted, at most the unit's) and its cancel flag seen per chunk: one
    archive is one unit, and a user cancelling a 10 GB tar should not wait for its end.
    A cancel or a lost lease stops the unit (its half-written staging goes)."""
    items = 0
    for chunk in chunks:
        lease.check()
        if lease.cancelled:
            raise IngestCancelled
        items += len(chunk.values)
        progress(items, min(report.bytes, unit.size_bytes))
        yield chunk


def _megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class _Reading:
    """What the job has read so far: its staged units (by index), items, bytes, failures."""

    plan: Plan
    done: dict[int, dict[str, Any]]
    report: Report
    items: int = 0
    read_bytes: int = 0
    f32: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.report.merge(record["report"])
        self.items += record["items"]
        self.read_bytes += record["bytes"]
        self.f32 += record["f32_bytes"]

    def message(self, items: int, read_bytes: int) -> str:
        return (f"read {items} items, {_megabytes(read_bytes)} of "
                f"{_megabytes(self.plan.total_bytes)} ({len(self.done)} of "
                f"{len(self.plan.units)} units)")


def _ingest(ctx: Context, job_id: int, params: dict[str, Any], lease: Lease,
            ) -> dict[str, Any]:
    settings, limits = ctx.settings, Limits.of(ctx.settings)
    staging = Staging(staging_root(settings), job_id, settings.max_inflated_bytes)
    staging.path.mkdir(parents=True, exist_ok=True)
    location, options, plan = _plan(ctx, params, staging, limits)
    reading = _resume(job_id, plan, staging.prepare(plan_fingerprint(plan)), options)
    _read_units(ctx, job_id, reading, options, limits, staging, lease)
    refuse_failures(reading.report, options.max_failure_share, location.display)
    lease.confirm()
    if lease.cancelled:
        raise IngestCancelled
    lease.report(0.99, f"registering {reading.items} items")
    registered = _register(ctx, params, reading, options, staging, lease)
    dataset = registered.dataset
    message = (f"dataset {dataset.id} registered: {dataset.n_items} items"
               if registered.created else
               f"the same content is registered already: dataset {dataset.id}")
    if reading.report.failed:
        message += (f" ({reading.report.failed} unreadable items skipped; see the dataset's "
                    "report)")
    retry_while_leased(lambda: finish(ctx.db, job_id, lease.owner, "succeeded",
                                      message=message, dataset_id=dataset.id),
                       lease, f"finish of job {job_id}")
    log.info("ingest succeeded job_id=%d dataset_id=%d items=%d created=%s", job_id,
             dataset.id, dataset.n_items, registered.created)
    return {"outcome": "succeeded", "dataset_id": dataset.id, "created": registered.created}


def _plan(ctx: Context, params: dict[str, Any], staging: Staging, limits: Limits,
          ) -> tuple[Location, IngestOptions, Plan]:
    """The job's source (an upload saved for it, or its uri), its options and its plan."""
    side: dict[str, str] = {}
    if params.get("upload_key"):
        location, side = _uploaded(ctx, params, staging)
    else:
        location = resolve_location(params["uri"], ctx.settings)
    options = options_of(params.get("options") or {}, ctx.settings, **side)
    plan = plan_npy_folder(location, options, limits) or plan_source(location, options,
                                                                     limits)
    return location, options, plan


def _resume(job_id: int, plan: Plan, done: dict[int, dict[str, Any]],
            options: IngestOptions) -> _Reading:
    """What earlier attempts staged under this plan, counted in."""
    reading = _Reading(plan, done, Report(keep=options.report_failures))
    for index in sorted(done):
        reading.add(done[index])
    shapes = [done[i]["item_shape"] for i in sorted(done) if done[i].get("item_shape")]
    if plan.pixels and plan.item_shape is None and shapes:
        plan.item_shape = tuple(shapes[0])  # the images read later must match it
    if done:
        log.info("ingest resuming job_id=%d after staged units=%d of %d items=%d", job_id,
                 len(done), len(plan.units), reading.items)
    return reading


def _read_units(ctx: Context, job_id: int, reading: _Reading, options: IngestOptions,
                limits: Limits, staging: Staging, lease: Lease) -> None:
    """Stage every unit not staged yet, reporting progress after each (and within it)."""
    plan, total = reading.plan, max(1, reading.plan.total_bytes)

    def progress() -> None:
        if retry_while_leased(lambda: ingest_progress(ctx.db, job_id, lease.owner,
                                                      reading.items, plan.n_items),
                              lease, f"progress of {job_id}"):
            lease.cancelled = True
        lease.report(min(0.99, reading.read_bytes / total),
                     reading.message(reading.items, reading.read_bytes))

    progress()
    for unit in plan.units:
        if unit.index in reading.done:
            continue
        lease.check()
        if lease.cancelled:
            raise IngestCancelled
        unit_report = Report(keep=options.report_failures)
        reader = read_npy_unit if plan.format == NPY_FOLDER else read_unit

        def within(n: int, b: int, items: int = reading.items,
                   read_bytes: int = reading.read_bytes) -> None:
            lease.report(min(0.99, (read_bytes + b) / total),
                         reading.message(items + n, read_bytes + b))

        chunks = _watched(reader(plan, unit, options, limits, unit_report), unit,
                          unit_report, lease, within)
        record = staging.write_unit(unit, chunks, unit_report, reading.f32)
        reading.done[unit.index] = record
        reading.add(record)
        progress()


def _register(ctx: Context, params: dict[str, Any], reading: _Reading, options: IngestOptions,
              staging: Staging, lease: Lease) -> Registered:
    """Register the dataset from the staged units in one transaction."""
    record = ingest_record(reading.plan, options, reading.report)

    def register() -> Registered:
        return register_dataset(ctx.db, ctx.artifacts, ctx.settings, params["name"],
                                staging.source(reading.plan, reading.done),
                                source_uri=params.get("uri"), ingest=record)

    try:
        return register()
    except Conflict:
        # An attempt that lost its lease may have registered the same content at the same
        # moment (the checksum's unique index refused one of the two): once it has
        # committed, registering again finds its dataset. A name taken by other content
        # is refused again, with the same message.
        lease.confirm()
        return register()
