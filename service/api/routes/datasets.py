"""/v1/datasets: multipart uploads streamed to disk, server-side sources, builtins.

Small array uploads and builtins register inside the request (201/200, `mode: sync`);
a `uri`, an archive, an image source or a large upload becomes an ingest job (202,
`mode: job`, see service.api.registration and workers.ingest)."""

from __future__ import annotations

import io
import math
import os
import tempfile
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from ingest.arrays import (
    IngestOptions,
    format_of,
    register_digits,
    register_file,
)
from models.transforms import item_values
from service.api.arrays import check_answer, is_image_shape
from service.api.codecs import media_type, parse_json, read_body
from service.api.deps import Id, ReadKey, Services, SvcDep, WriteKey, in_thread
from service.api.error_responses import ERRORS
from service.api.errors import BodyTooLarge
from service.api.registration import (
    check_name,
    copy_upload,
    reference_hash,
    reference_params,
    runs_as_job,
    save_upload,
    stem,
    submit,
)
from service.api.schemas.datasets import (
    DatasetByReference,
    DatasetItemsOut,
    DatasetOut,
    IngestAccepted,
)
from service.api.schemas.jobs import JobOut
from store.datasets import (
    dataset_array,
    delete_dataset,
    get_dataset,
    item_rows,
    list_datasets,
)
from store.errors import Conflict, InvalidInput, UnsupportedFormat

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERRORS)

UPLOAD_SCHEMA = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": ".npy, .npz, .parquet or .csv (up to ingest_sync_max_bytes: "
                                "registered in the request, 201), or larger, or an archive "
                                "of images (.zip, .tar, .tar.gz, .tgz), an image parquet, "
                                "an IDX file: an ingest job (202)"},
        "name": {"type": "string", "description": "defaults to the file's name"},
        "labels": {"type": "string", "format": "binary", "description": ".npy, one per item"},
        "keys": {"type": "string", "format": "binary", "description": ".npy, one per item"},
        "array": {"type": "string", "description": ".npz member holding the data"},
        "key_column": {"type": "string"},
        "label_column": {"type": "string"},
        "feature_columns": {"type": "string", "description": "comma-separated"},
        "metadata_columns": {"type": "string", "description": "comma-separated"},
        "format": {"type": "string", "description": "default: told by the extension"},
        "image_size": {"type": "string", "description": "N or HxW: resize + centre crop"},
        "color": {"type": "string", "enum": ["grey", "rgb"]},
        "image_column": {"type": "string", "description": "parquet: the column of images"},
        "max_failure_share": {"type": "number", "minimum": 0, "maximum": 1},
    },
}
CREATE_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": UPLOAD_SCHEMA},
    "application/json": {"schema": {"$ref": "#/components/schemas/DatasetByReference"}},
}}}
TEXT_FIELDS = ("name", "array", "key_column", "label_column", "feature_columns",
               "metadata_columns", "format", "image_size", "color", "image_column",
               "max_failure_share")
IdempotencyKey = Header(None, alias="Idempotency-Key", max_length=200,
                        pattern=r"^[!-~]([ -~]*[!-~])?$",
                        description="repeat an ingest submission safely (as for training)")


def _columns(value: str | None) -> list[str] | None:
    return [c.strip() for c in value.split(",") if c.strip()] if value else None


def _save(upload: UploadFile, folder: str, suffix: str, budget: int) -> tuple[str, int]:
    """The part copied to a file of its own, counted: at most `budget` bytes (what is left
    of `max_upload_temp_bytes`). Returns the path and the bytes written."""
    fd, path = tempfile.mkstemp(dir=folder, suffix=suffix)
    os.close(fd)
    return path, copy_upload(upload, path, budget)


def _upload_size(upload: UploadFile) -> int:
    if upload.size is not None:
        return int(upload.size)
    upload.file.seek(0, os.SEEK_END)
    return int(upload.file.tell())


def _ingest_upload(svc: Services, form: Any, key: str | None) -> tuple[Any, bool, str]:
    """(dataset or job, created, mode): small array files register here (`sync`);
    archives, image sources and large files become an ingest job (`job`)."""
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise InvalidInput("multipart field 'file' (the data file) is missing")
    filename = os.path.basename(upload.filename or "")
    fields = {}
    for field in TEXT_FIELDS:
        value = form.get(field)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"form field {field!r} must be text")
        fields[field] = value
    name = fields["name"] or stem(filename)
    if runs_as_job(upload, filename, _upload_size(upload), fields,
                   svc.settings.ingest_sync_max_bytes):
        check_name(name)
        params, request_hash = save_upload(svc, form, filename, fields)
        job, created = submit(svc, name, params, request_hash, key)
        return job, created, "job"
    fmt = format_of(filename)  # UnsupportedFormat (415) before anything is written
    folder = svc.settings.data_dir / "uploads"
    folder.mkdir(parents=True, exist_ok=True)
    # named after this process: a sweep at start removes what a killed process left
    with tempfile.TemporaryDirectory(dir=folder, prefix=f"{os.getpid()}-") as tmp:
        budget = svc.settings.max_upload_temp_bytes
        data, used = _save(upload, tmp, "." + fmt, budget)
        side: dict[str, str | None] = {}
        for field in ("labels", "keys"):
            part = form.get(field)
            if part is None:
                side[field] = None
            elif isinstance(part, UploadFile):
                side[field], written = _save(part, tmp, ".npy", budget - used)
                used += written
            else:
                raise InvalidInput(f"multipart field {field!r} must be an .npy file")
        options = IngestOptions(array=fields["array"], key_column=fields["key_column"],
                                label_column=fields["label_column"],
                                feature_columns=_columns(fields["feature_columns"]),
                                metadata_columns=_columns(fields["metadata_columns"]),
                                keys_path=side["keys"], labels_path=side["labels"])
        registered = register_file(svc.db, svc.artifacts, svc.settings, name, data,
                                   filename=filename, options=options, temp_bytes=used)
    return registered.dataset, registered.created, "sync"


def _ingest_reference(svc: Services, body: DatasetByReference, path: str,
                      key: str | None) -> tuple[Any, bool, str]:
    if (body.uri is None) == (body.builtin is None):
        raise InvalidInput("give exactly one of 'uri' (a file or folder under an allowed "
                           "root, or an object under an allowed URL) and 'builtin'")
    if body.builtin == "digits":
        if body.options():
            raise InvalidInput("reading options go with a 'uri', not a builtin")
        registered = register_digits(svc.db, svc.artifacts, svc.settings, name=body.name)
        return registered.dataset, registered.created, "sync"
    params = reference_params(svc, body)
    job, created = submit(svc, body.name, params, reference_hash(path, body), key)
    return job, created, "job"


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=CREATE_BODY,
             responses={200: {"model": DatasetOut,
                              "description": "the same content is already registered"},
                        202: {"model": IngestAccepted,
                              "description": "an ingest job registers it (a `uri`, an "
                                             "archive, a large upload): follow the job"}},
             summary="Register a dataset: upload a file or archive, name a server-side "
                     "source, or a builtin")
async def create_dataset(_: WriteKey, svc: SvcDep, request: Request, response: Response,
                         idempotency_key: str | None = IdempotencyKey) -> Any:
    kind = media_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=3, max_fields=20, max_part_size=1 << 20)
        except BodyTooLarge:
            raise
        except Exception:  # starlette's parser: malformed multipart, too many parts
            raise InvalidInput("the multipart body is malformed") from None
        try:
            made, created, mode = await in_thread(_ingest_upload, svc, form, idempotency_key)
        finally:
            await form.close()
    elif kind == "application/json":
        body = parse_json(await read_body(request), DatasetByReference)
        made, created, mode = await in_thread(_ingest_reference, svc, body, request.url.path,
                                              idempotency_key)
    else:
        raise UnsupportedFormat(f"content type {kind!r} is not accepted: upload with "
                                "multipart/form-data or send JSON {\"name\", \"uri\"|\"builtin\"}")
    if mode == "job":
        headers = {"Location": f"/v1/jobs/{made.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        answer = IngestAccepted(job=JobOut.of(made))
        return JSONResponse(answer.model_dump(mode="json"), status_code=202, headers=headers)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/datasets/{made.id}"
    return DatasetOut.of(made).model_copy(update={"mode": "sync"})


@router.get("", response_model=list[DatasetOut])
def datasets(_: ReadKey, svc: SvcDep, limit: int = Query(100, ge=1, le=1000),
             offset: int = Query(0, ge=0, le=2**62)) -> list[DatasetOut]:
    return [DatasetOut.of(d) for d in list_datasets(svc.db, limit, offset)]


@router.get("/{dataset_id}", response_model=DatasetOut)
def dataset(_: ReadKey, svc: SvcDep, dataset_id: Id) -> DatasetOut:
    return DatasetOut.of(get_dataset(svc.db, dataset_id))


MAX_ITEMS_PAGE = 256


def _items(svc: Services, dataset_id: int, offset: int, limit: int, what: str,
           ) -> tuple[Any, np.ndarray, list[Any]]:
    """A page of items, refused (413) before anything is read when its values (items x
    values per item) pass LATENTBANK_MAX_RESPONSE_VALUES."""
    ds = get_dataset(svc.db, dataset_id)
    stop = min(ds.n_items, offset + limit)
    if offset >= ds.n_items:
        raise InvalidInput(f"offset {offset} is past the dataset's {ds.n_items} items")
    check_answer(stop - offset, math.prod(ds.item_shape), svc.settings.max_response_values,
                 what)
    data = dataset_array(svc.artifacts, ds, str(svc.settings.cache_dir))
    # 8-bit items (uint8 storage) are read as their values, x / 255 in [0, 1]
    return ds, item_values(np.asarray(data[offset:stop])), item_rows(svc.db, ds.id, offset,
                                                                       stop)


@router.get("/{dataset_id}/items", response_model=DatasetItemsOut,
            summary="A page of the dataset's items: keys, labels and values")
def dataset_items(_: ReadKey, svc: SvcDep, dataset_id: Id,
                  offset: int = Query(0, ge=0, le=2**62),
                  limit: int = Query(16, ge=1, le=MAX_ITEMS_PAGE)) -> Response:
    ds, x, rows = _items(svc, dataset_id, offset, limit, "dataset items")
    return Response(orjson.dumps({
        "dataset_id": ds.id, "offset": offset, "n": len(x), "item_shape": ds.item_shape,
        "keys": [r.key for r in rows], "labels": [r.label for r in rows],
        "x": np.ascontiguousarray(x, dtype=np.float32)}, option=orjson.OPT_SERIALIZE_NUMPY),
        media_type="application/json")


@router.get("/{dataset_id}/thumbnails.png", responses={200: {"content": {"image/png": {}}}},
            response_class=Response,
            summary="A grid of the dataset's items as images, grey or RGB (8-bit items as they "
                     "are, others scaled by the dataset's value range)")
def thumbnails(_: ReadKey, svc: SvcDep, dataset_id: Id, offset: int = Query(0, ge=0, le=2**62),
               n: int = Query(32, ge=1, le=MAX_ITEMS_PAGE),
               columns: int = Query(8, ge=1, le=64)) -> Response:
    ds = get_dataset(svc.db, dataset_id)
    if not is_image_shape(ds.item_shape):  # before any item is read
        raise Conflict(f"items of shape {list(ds.item_shape)} are not images")
    ds, x = _items(svc, dataset_id, offset, n, "thumbnails")[:2]
    from service.api.plots import image_grid  # after the bounds: matplotlib is slow to load

    if ds.dtype == "uint8":  # 8-bit images: drawn as they are, not stretched
        scaled = x
    else:
        lo, hi = min(0.0, ds.min_value), ds.max_value
        scaled = (x.astype(np.float32) - lo) / (hi - lo if hi > lo else 1.0)
    buffer = io.BytesIO()
    image_grid(scaled, columns=min(columns, len(scaled))).save(buffer, format="PNG")
    return Response(buffer.getvalue(), media_type="image/png")


@router.delete("/{dataset_id}", status_code=204, response_class=Response)
def remove_dataset(_: WriteKey, svc: SvcDep, dataset_id: Id) -> Response:
    delete_dataset(svc.db, svc.artifacts, dataset_id)
    return Response(status_code=204)
