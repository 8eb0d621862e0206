"""/v1/embeddings: stored latent codes, kNN search, outliers, streamed export, plots."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from service.api.arrays import model_view
from service.api.codecs import media_type, parse_json, read_body
from service.api.deps import ReadKey, Services, SetId, SvcDep, WriteKey, in_thread
from service.api.error_responses import ERRORS
from service.api.errors import describe_validation
from service.api.images import image_body, image_input, is_image_request, read_upload
from service.api.schemas.embeddings import (
    BatchAnswer,
    BatchSearchOut,
    BatchSearchRequest,
    EmbeddingSetOut,
    HitOut,
    ItemOut,
    OutliersOut,
    ProjectionOut,
    QueryItem,
    SearchFilterIn,
    SearchOut,
    SearchRequest,
)
from service.api.serving_policy import ready_model
from store.db import Database
from store.deletion import delete_set
from store.embedding_sets import get_set, list_sets
from store.errors import Conflict, InvalidInput, TooLarge, UnsupportedFormat
from store.retrieval import export_pages, get_item, outliers, sample_items
from store.search import SearchFilter, search, search_many
from store.settings import Settings
from store.tables import SET_STATUSES, EmbeddingSet

router = APIRouter(prefix="/v1/embeddings", tags=["embeddings"], responses=ERRORS)
PAGE_ROWS = 5_000


def _hit(h: Any, with_distance: bool = True) -> HitOut:
    return HitOut(key=h.key, index=h.index, label=h.label,
                  distance=h.distance if with_distance else None, elbo=h.elbo,
                  log_px=h.log_px, metadata=h.metadata)


def _readable(db: Database, set_id: int) -> EmbeddingSet:
    es = get_set(db, set_id)
    if es.status not in ("ready", "finishing"):
        raise Conflict(f"embedding set {set_id} is {es.status}, not ready")
    return es


def _reader(svc: Services, set_id: int) -> tuple[EmbeddingSet, Database]:
    """The readable set and the server to read its rows from: a replica within the lag
    bound that knows the set as ready, else the primary (store/replicas.py)."""
    return svc.reads.run(lambda db: (_readable(db, set_id), db))


@router.get("", response_model=list[EmbeddingSetOut])
def embedding_sets(_: ReadKey, svc: SvcDep,
                   model_id: int | None = Query(None, ge=1, le=2**63 - 1),
                   status: Literal[SET_STATUSES] | None = None,
                   limit: int = Query(100, ge=1, le=1000),
                   offset: int = Query(0, ge=0, le=2**62)) -> list[EmbeddingSetOut]:
    rows = list_sets(svc.db, model_id=model_id, status=status, limit=limit, offset=offset)
    return [EmbeddingSetOut.of(e) for e in rows]


@router.get("/{set_id}", response_model=EmbeddingSetOut)
def embedding_set(_: ReadKey, svc: SvcDep, set_id: SetId) -> EmbeddingSetOut:
    return EmbeddingSetOut.of(get_set(svc.db, set_id))


@router.delete("/{set_id}", status_code=204, response_class=Response,
               summary="Delete an embedding set: its rows and its index; 409 while aliased, "
                       "used by a job, or building its index")
def remove_set(_: WriteKey, svc: SvcDep, set_id: SetId) -> Response:
    delete_set(svc.db, set_id)
    return Response(status_code=204)


@router.get("/{set_id}/items/{key:path}", response_model=ItemOut,
            summary="One item's latent code and ELBO terms by its key")
def item(_: ReadKey, svc: SvcDep, set_id: SetId, key: str) -> ItemOut:
    row = svc.reads.run(lambda db: (_readable(db, set_id), get_item(db, set_id, key))[1])
    return ItemOut(**{**row, "mu": row["mu"].tolist(), "logvar": row["logvar"].tolist()})


def _check_search(settings: Settings, queries: int, k: int) -> None:
    """Refuse (413) a search whose answer passes its bounds, before anything is read: k
    (past 100 every query scans the whole set) and queries x k (one hit, with its item's
    metadata, per neighbour)."""
    if k > settings.search_max_k:
        raise TooLarge(f"k is {k}; the limit is {settings.search_max_k} "
                       "(LATENTBANK_SEARCH_MAX_K)")
    if queries * k > settings.search_max_results:
        raise TooLarge(f"{queries} queries x k = {k} is {queries * k} neighbours; one search "
                       f"answers at most {settings.search_max_results} "
                       "(LATENTBANK_SEARCH_MAX_RESULTS): ask for a smaller k or send fewer "
                       "queries per request")


SEARCH_FIELDS = ("k", "metric", "exact", "filter")
SEARCH_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/SearchRequest"}},
    **image_body({"k": {"type": "integer", "default": 10, "minimum": 1, "maximum": 1000},
                  "metric": {"type": "string", "enum": ["l2", "cosine"],
                             "default": "l2"},
                  "exact": {"type": "boolean", "default": False},
                  "filter": {"type": "string",
                             "description": "JSON, as SearchRequest's filter"}},
                 "k, metric, exact and filter (JSON)")}}}


def _search_params(fields: dict[str, str]) -> SearchRequest:
    """An image search's k, metric, exact and filter (form fields or query parameters)
    checked as a JSON search's are."""
    unknown = sorted(set(fields) - set(SEARCH_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown parameter {unknown[0]!r}: an image search takes "
                           f"{', '.join(SEARCH_FIELDS)}")
    values: dict[str, Any] = dict(fields)
    if "filter" in values:
        try:
            # orjson: nesting past 1024 levels is a ValueError (json.loads recurses into a
            # RecursionError, a 500, at 60,000 brackets)
            values["filter"] = orjson.loads(values["filter"])
        except ValueError:
            raise InvalidInput("'filter' must be JSON, e.g. {\"label\": [\"3\"]}") from None
    try:
        return SearchRequest.model_validate(values)
    except ValidationError as exc:
        raise InvalidInput(describe_validation(list(exc.errors()))) from None


async def _image_query(request: Request, svc: Services, set_id: int,
                       ) -> tuple[SearchRequest, np.ndarray]:
    """The search's parameters and its vector: the uploaded image through the set's
    model's encoder (posterior mean), transformed as the set's dataset's items were."""
    upload = await read_upload(request, SEARCH_FIELDS)
    body = _search_params(upload.fields)
    _check_search(svc.settings, 1, body.k)
    es, _ = await in_thread(_reader, svc, set_id)
    model = await ready_model(svc, es.model_id, replica=True)
    config = model.config["model"]
    x = model_view(await image_input(svc, upload, es.dataset_id, config), config)
    out = await svc.inference.run(model.id, "encoder", model.encoder_sha256 or "",
                                  model.encoder_uri or "", x)
    return body, np.asarray(out["mu"][0], dtype=np.float64)


@router.post("/{set_id}/search", response_model=SearchOut, openapi_extra=SEARCH_BODY,
             summary="k nearest neighbours of a vector, a stored item or an uploaded image "
                     "(encoded by the set's model), with filters")
async def search_set(_: ReadKey, svc: SvcDep, request: Request, set_id: SetId) -> SearchOut:
    if is_image_request(request):
        body, vector = await _image_query(request, svc, set_id)
    else:
        kind = media_type(request)
        if kind != "application/json":
            raise UnsupportedFormat(
                f"content type {kind!r} is not accepted: send JSON (a vector or a key), or "
                "an image (image/png, image/jpeg, image/webp, or multipart field 'image')")
        body = parse_json(await read_body(request), SearchRequest)
        _check_search(svc.settings, 1, body.k)
        vector = None if body.vector is None else np.asarray(body.vector)
    result = await in_thread(svc.reads.run, search, svc.settings, set_id, vector=vector,
                             key=body.key, k=body.k, metric=body.metric,
                             flt=_filter(body.filter), exact=body.exact)
    return SearchOut(results=[_hit(h) for h in result.hits], plan=result.plan)


@router.post("/{set_id}/search/batch", response_model=BatchSearchOut,
             summary="k nearest neighbours of many vectors or stored items, one request")
def search_batch(_: ReadKey, svc: SvcDep, set_id: SetId, body: BatchSearchRequest) -> Response:
    _check_search(svc.settings, len(body.queries), body.k)
    queries: list[Any] = []
    for n, q in enumerate(body.queries):
        if (q.vector is None) == (q.key is None):
            raise InvalidInput(f"query {n}: give exactly one of 'vector' and 'key'")
        queries.append(q.key if q.key is not None else np.asarray(q.vector))
    results = svc.reads.run(search_many, svc.settings, set_id, queries, k=body.k,
                            metric=body.metric, flt=_filter(body.filter), exact=body.exact)
    # up to search_max_results hits, serialized here (off the event loop)
    return Response(BatchSearchOut(answers=[
        BatchAnswer(results=[_hit(h) for h in r.hits], plan=r.plan,
                    query=None if r.query is None else QueryItem(**r.query))
        for r in results]).model_dump_json().encode(), media_type="application/json")


def _filter(f: SearchFilterIn | None) -> SearchFilter | None:
    if f is None:
        return None
    return SearchFilter(label=f.label, metadata=f.metadata,
                        elbo=tuple(f.elbo) if f.elbo else None,  # type: ignore[arg-type]
                        log_px=tuple(f.log_px) if f.log_px else None)  # type: ignore[arg-type]


@router.get("/{set_id}/outliers", response_model=OutliersOut,
            summary="The items of lowest log p(x) (or ELBO without it)")
def outliers_of(_: ReadKey, svc: SvcDep, set_id: SetId,
                k: int = Query(10, ge=1, le=1000)) -> OutliersOut:
    es, hits = svc.reads.run(lambda db: (_readable(db, set_id), outliers(db, set_id, k)))
    return OutliersOut(results=[_hit(h, False) for h in hits],
                       ranked_by="log_px" if es.importance_samples > 0 else "elbo")


def _ndjson(pages: Iterator[list[dict[str, Any]]]) -> Iterator[bytes]:
    for page in pages:
        yield "".join(json.dumps(row) + "\n" for row in page).encode()


class _Chunks(io.RawIOBase):
    """A write-only file whose bytes are taken out after each Parquet row group."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.position = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        block = bytes(data)
        self.parts.append(block)
        self.position += len(block)
        return len(block)

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        out, self.parts = b"".join(self.parts), []
        return out


def _parquet(pages: Iterator[list[dict[str, Any]]], dim: int) -> Iterator[bytes]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("index", pa.int64()), ("key", pa.string()), ("label", pa.string()),
                        ("mu", pa.list_(pa.float32(), dim)),
                        ("logvar", pa.list_(pa.float32(), dim)), ("elbo", pa.float64()),
                        ("reconstruction", pa.float64()), ("kl", pa.float64()),
                        ("log_px", pa.float64()), ("log_px_se", pa.float64()),
                        ("ess", pa.float64())])
    sink = _Chunks()
    with pq.ParquetWriter(sink, schema, compression="zstd") as writer:
        for page in pages:
            columns = {name: [row[name] for row in page] for name in schema.names}
            writer.write_table(pa.Table.from_pydict(columns, schema=schema))
            yield sink.take()
    yield sink.take()


@router.get("/{set_id}/export", responses={
    200: {"content": {"application/x-ndjson": {}, "application/vnd.apache.parquet": {}},
          "description": "every item: index, key, label, mu, logvar, elbo, reconstruction, "
                         "kl, log_px, log_px_se, ess"}},
    response_class=StreamingResponse,
    summary="Stream the whole set as NDJSON or Parquet (bounded memory)")
def export(_: ReadKey, svc: SvcDep, set_id: SetId,
           format: Literal["ndjson", "parquet"] = Query("ndjson")) -> StreamingResponse:
    es, db = _reader(svc, set_id)
    pages = export_pages(db, set_id, PAGE_ROWS)
    if format == "parquet":
        return StreamingResponse(_parquet(pages, es.dim),
                                 media_type="application/vnd.apache.parquet", headers={
                                     "Content-Disposition":
                                         f'attachment; filename="embedding-{set_id}.parquet"'})
    return StreamingResponse(_ndjson(pages), media_type="application/x-ndjson")


def _latent_png(db: Database, es: EmbeddingSet) -> bytes:
    from service.api.plots import plot_latents

    mu, labels = [], []
    for page in export_pages(db, es.id, 20_000):
        mu.extend(row["mu"] for row in page)
        labels.extend(row["label"] for row in page)
        if len(mu) >= 20_000:  # a scatter of more points says nothing more
            break
    codes = None
    if all(label is not None for label in labels):
        try:
            codes = np.asarray([float(v) for v in labels])
        except ValueError:
            codes = np.unique(np.asarray(labels), return_inverse=True)[1].astype(float)
    buffer = io.BytesIO()
    plot_latents(np.asarray(mu, dtype=np.float64), codes, buffer)
    return buffer.getvalue()


MAX_PROJECTED = 5000


def _projection(svc: Services, set_id: int, n: int) -> dict[str, Any]:
    es, rows = svc.reads.run(lambda db: (_readable(db, set_id), sample_items(db, set_id, n)))
    mu = np.asarray([r["mu"] for r in rows], dtype=np.float64).reshape(len(rows), es.dim)
    centred = mu - mu.mean(0) if len(mu) else mu
    if len(mu) >= 2:
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt[:2]
        share = singular ** 2 / max(float((singular ** 2).sum()), 1e-300)
        explained = [float(v) for v in share[:2]]
    else:
        axes, explained = np.eye(es.dim)[:2], [0.0, 0.0]
    xy = centred @ axes.T
    if xy.shape[1] < 2:  # a 1-D latent space: the second axis is 0
        xy = np.c_[xy, np.zeros(len(xy))]
    return {"set_id": set_id, "n_items": es.n_items, "keys": [r["key"] for r in rows],
            "labels": [r["label"] for r in rows], "points": xy.round(6).tolist(),
            "explained_variance": explained + [0.0] * (2 - len(explained)),
            "elbo": [r["elbo"] for r in rows], "log_px": [r["log_px"] for r in rows]}


@router.get("/{set_id}/projection", response_model=ProjectionOut,
            summary="2-D PCA of the posterior means of an even sample of the set's items")
def projection(_: ReadKey, svc: SvcDep, set_id: SetId,
               n: int = Query(2000, ge=1, le=MAX_PROJECTED)) -> dict[str, Any]:
    return _projection(svc, set_id, n)


@router.get("/{set_id}/plots/latent.png", responses={200: {"content": {"image/png": {}}}},
            response_class=Response, summary="2-D PCA of the posterior means, coloured by label")
def latent_png(_: ReadKey, svc: SvcDep, set_id: SetId) -> Response:
    es, db = _reader(svc, set_id)
    return Response(_latent_png(db, es), media_type="image/png")
