"""Registrations that run as ingest jobs (a `uri`, an uploaded archive, image parquet or IDX
file, a large array upload), each checked here before anything is queued
(docs/internals/ingest.md)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

from starlette.datastructures import UploadFile

from ingest.paths import resolve_location
from ingest.requests import clean_options
from service.api.deps import Services
from service.api.schemas.datasets import DatasetByReference
from store.artifacts import upload_key
from store.errors import DatasetError, InvalidInput, TooLarge
from store.jobs import get_job
from store.publishing import publish
from store.submit import submit_ingest
from store.tables import Job

ARRAY_SUFFIXES = (".npy", ".npz", ".parquet", ".csv")
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
OPTION_FIELDS = ("format", "image_size", "color", "image_column", "max_failure_share")
IMAGE_OPTIONS = ("image_size", "color", "image_column")
MAX_FOOTER_BYTES = 16 << 20  # of a parquet upload, read to tell whether it holds images


def check_name(name: str | None) -> str:
    if not name or len(name) > 200 or name != name.strip():
        raise DatasetError("name must be 1-200 characters without surrounding spaces")
    return name


def stem(filename: str) -> str:
    """A file's name without its extension (both of `.tar.gz`): an upload's default name."""
    low = filename.lower()
    for suffix in (".tar.gz", ".idx.gz", "-ubyte.gz"):
        if low.endswith(suffix):
            return filename[:-len(suffix)] if suffix != "-ubyte.gz" else filename[:-3]
    return filename.rsplit(".", 1)[0]


def is_idx(filename: str) -> bool:
    low = filename.lower()
    return "-ubyte" in low or low.endswith((".idx", ".idx.gz"))


def has_image_column(upload: UploadFile) -> bool:
    """Whether an uploaded .parquet holds images (a column of {bytes, path} structs or of
    bytes), from its footer only; an unreadable file is left to the reader's own error."""
    import pyarrow.parquet as pq

    from ingest.imageparquet import image_column_of

    try:
        upload.file.seek(-8, os.SEEK_END)
        tail = upload.file.read(8)
        if tail[4:] != b"PAR1" or int.from_bytes(tail[:4], "little") > MAX_FOOTER_BYTES:
            return False  # not parquet, or a footer too large to read here: the reader's
        upload.file.seek(0)
        found = image_column_of(pq.ParquetFile(upload.file).schema_arrow, None)
    except Exception:  # not a parquet file: the synchronous reader says why
        return False
    finally:
        upload.file.seek(0)
    return found is not None


def runs_as_job(upload: UploadFile, filename: str, size: int,
                fields: dict[str, str | None], sync_max_bytes: int) -> bool:
    """Whether an upload becomes an ingest job: archives, IDX files, image parquet,
    anything with image options, and array files over `sync_max_bytes`; small array files
    register at once."""
    low = filename.lower()
    if low.endswith(ARCHIVE_SUFFIXES) or is_idx(low):
        return True
    if any(fields.get(f) for f in IMAGE_OPTIONS) or fields.get("format") not in (
            None, "", "npy", "npz", "parquet", "csv"):
        return True
    if low.endswith(ARRAY_SUFFIXES) and size > sync_max_bytes:
        return True
    return low.endswith(".parquet") and has_image_column(upload)


def _safe_name(filename: str) -> str:
    """The upload's file name in the store: its extension kept (readers go by it), never
    the name of a keys/labels part beside it."""
    return "source-" + (re.sub(r"[^A-Za-z0-9._-]", "_", filename)[-120:].lstrip(".")
                        or "upload")


def copy_upload(upload: UploadFile, path: str, budget: int, digest: Any = None) -> int:
    """The part copied to `path`, counted: at most `budget` bytes (what is left of
    `max_upload_temp_bytes`), hashed into `digest` when given. Returns the bytes."""
    written = 0
    with open(path, "wb") as out:
        upload.file.seek(0)
        while block := upload.file.read(1 << 20):
            written += len(block)
            if written > budget:
                raise TooLarge("the uploaded parts need more temporary disk than "
                               "max_upload_temp_bytes allows")
            if digest is not None:
                digest.update(block)
            out.write(block)
    return written


def save_upload(svc: Services, form: Any, filename: str, fields: dict[str, str | None],
                ) -> tuple[dict[str, Any], str]:
    """Save the upload (and its keys/labels parts) for a job: (the job's params, the hash
    of the request for an Idempotency-Key). The folder is the job's from here on."""
    options = clean_options({f: fields.get(f) for f in (
        "array", "key_column", "label_column", "feature_columns", "metadata_columns",
        *OPTION_FIELDS) if fields.get(f) not in (None, "")}, svc.settings)
    root = svc.settings.data_dir.resolve() / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f"{os.getpid()}-")
    params: dict[str, Any] = {"filename": filename, "options": options}
    try:
        digest = hashlib.sha256(json.dumps([filename, fields], sort_keys=True).encode())
        budget = svc.settings.max_upload_temp_bytes
        name = _safe_name(filename)
        used = copy_upload(form.get("file"), os.path.join(tmp, name), budget, digest)
        for part in ("keys", "labels"):
            upload = form.get(part)
            if upload is None:
                continue
            if not isinstance(upload, UploadFile):
                raise InvalidInput(f"multipart field {part!r} must be an .npy file")
            digest.update(part.encode())
            used += copy_upload(upload, os.path.join(tmp, f"{part}.npy"), budget - used, digest)
            params[f"{part}_path"] = f"{part}.npy"
        token = uuid.uuid4().hex
        params["upload_folder"] = upload_key(token)
        params["upload_key"] = upload_key(token, name)
        svc.artifacts.put_local_file(os.path.join(tmp, name), params["upload_key"])
        for part in ("keys", "labels"):
            if f"{part}_path" in params:
                key = upload_key(token, params.pop(f"{part}_path"))
                svc.artifacts.put_local_file(os.path.join(tmp, f"{part}.npy"), key)
                params[f"{part}_key"] = key
    except BaseException:
        if "upload_folder" in params:
            svc.artifacts.delete(params["upload_folder"])
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return params, digest.hexdigest()


def reference_params(svc: Services, body: DatasetByReference) -> dict[str, Any]:
    """A `uri` registration's job params, checked: the uri resolves under an allowed
    root or URL (403/404 otherwise), the options parse (422 naming the field)."""
    assert body.uri is not None
    check_name(body.name)
    options = clean_options(body.options(), svc.settings)
    resolve_location(body.uri, svc.settings)
    return {"uri": body.uri, "options": options}


def submit(svc: Services, name: str, params: dict[str, Any], request_hash: str,
           key: str | None) -> tuple[Job, bool]:
    """Queue the job (or find the one an Idempotency-Key made: then a saved upload is
    not needed) and publish it."""
    if key is not None and (not key.strip() or not key.isprintable()):
        raise InvalidInput("Idempotency-Key must be 1-200 printable characters")
    try:
        job, created = submit_ingest(svc.db, name, params, idempotency_key=key,
                                     request_hash=request_hash,
                                     max_attempts=svc.settings.job_max_attempts)
    except BaseException:
        if params.get("upload_folder"):
            svc.artifacts.delete(params["upload_folder"])
        raise
    if not created and params.get("upload_folder"):
        svc.artifacts.delete(params["upload_folder"])
    if created:
        svc.metrics.submissions.labels("ingest").inc()
    if job.published_at is None and job.status == "queued":
        publish(svc.db, svc.sender, job)
        job = get_job(svc.db, job.id)
    return job, created


def reference_hash(path: str, body: DatasetByReference) -> str:
    canonical = json.dumps([path, body.model_dump(mode="json")], sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
