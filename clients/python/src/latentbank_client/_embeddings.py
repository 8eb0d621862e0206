"""Embedding sets: stored latent codes, search, outliers, streamed export."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from latentbank_client._core import Call, Download, Plan, float_rows, ident, ref, submission
from latentbank_client._jobs import LINKED, Bound, Job, Resource
from latentbank_client._models import image_part
from latentbank_client.display import PNG, html_table, latents_figure, pyplot
from latentbank_client.errors import InvalidInput, LatentbankError
from latentbank_client.results import Item, Outliers, Projection, SearchResult, build

METRICS = ("l2", "cosine")
VECTOR_TYPES = ("vector", "halfvec")


def _arrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LatentbankError("reading an export needs pyarrow: pip install "
                              "'latentbank-client[pandas]'") from None
    return pq


@dataclass(kw_only=True)
class EmbeddingSet(Bound):
    """A dataset's items encoded by a model (server schema EmbeddingSetOut): per item mu,
    logvar, the ELBO terms and, with importance_samples K > 0, log p(x)."""

    id: int
    model_id: int | None = None
    dataset_id: int | None = None
    status: str = ""
    dim: int | None = None
    n_items: int = 0
    importance_samples: int = 0
    index_status: str | None = None
    index_metric: str | None = None
    vector_type: str = "vector"  # how the set stores its latents: float32 or float16
    index_build: dict[str, Any] | None = None
    stats: dict[str, Any] | None = None
    created_at: dt.datetime | None = None
    ready_at: dt.datetime | None = None

    def _path(self, tail: str) -> str:
        return f"/v1/embeddings/{self.id}/{tail}"

    def _query(self, k: int, metric: str, exact: bool, filter: dict[str, Any] | None,
               ) -> dict[str, Any]:
        if metric not in METRICS:
            raise InvalidInput(f"metric must be one of {', '.join(METRICS)}; got {metric!r}")
        if filter is not None and not isinstance(filter, dict):
            raise InvalidInput("filter= must be a dict: label, metadata, elbo [lo, hi], "
                               "log_px [lo, hi]")
        body: dict[str, Any] = {"k": int(k), "metric": metric, "exact": bool(exact)}
        if filter is not None:
            body["filter"] = filter
        return body

    def search(self, vector: Any = None, *, key: str | None = None, image: Any = None,
               k: int = 10, filter: dict[str, Any] | None = None, metric: str = "l2",
               exact: bool = False) -> SearchResult:
        """The `k` nearest items to a latent `vector`, to stored item `key` (the item
        itself left out), or to an `image` (a path or bytes, encoded by the set's model).
        `filter`: {"label": "3" | [...], "metadata": {...}, "elbo": [lo, hi],
        "log_px": [lo, hi]}. Returns a list of `Hit` (key, index, label, distance, elbo,
        log_px, metadata), nearest first, with the database's `plan`."""
        if sum(v is not None for v in (vector, key, image)) != 1:
            raise InvalidInput("give exactly one of vector, key= and image=")
        body = self._query(k, metric, exact, filter)
        if image is not None:
            form = {name: (json.dumps(v) if name == "filter" else str(v).lower()
                           if isinstance(v, bool) else str(v)) for name, v in body.items()}
            call = Call("POST", self._path("search"), files={"image": image_part(image)},
                        data=form, safe=True)
        else:
            if vector is not None:
                body["vector"] = float_rows(vector, "vector", self.dim)[0].tolist()
            else:
                body["key"] = str(key)
            call = Call("POST", self._path("search"), json=body, safe=True)

        def plan() -> Plan:
            response = yield call
            return SearchResult.of(response.json())
        return self._run(plan())

    def search_many(self, vectors: Any = None, *, keys: list[str] | None = None,
                    k: int = 10, filter: dict[str, Any] | None = None, metric: str = "l2",
                    exact: bool = False) -> list[SearchResult]:
        """Many queries in one request: each row of `vectors` (n, dim), then each of
        `keys`; one `SearchResult` per query in that order (a key's own item in
        `.query`)."""
        queries: list[dict[str, Any]] = []
        if vectors is not None:
            queries += [{"vector": row.tolist()}
                        for row in float_rows(vectors, "vectors", self.dim)]
        if keys is not None:
            if isinstance(keys, str):
                raise InvalidInput("keys= must be a list of keys, not one string")
            queries += [{"key": str(key)} for key in keys]
        if not queries:
            raise InvalidInput("give vectors and/or keys= to search for")
        body = {**self._query(k, metric, exact, filter), "queries": queries}

        def plan() -> Plan:
            response = yield Call("POST", self._path("search/batch"), json=body, safe=True)
            return [SearchResult.of(a) for a in response.json()["answers"]]
        return self._run(plan())

    def outliers(self, k: int = 10) -> Outliers:
        """The `k` items of lowest log p(x) (or ELBO when the set has no log p(x))."""
        def plan() -> Plan:
            response = yield Call("GET", self._path("outliers"), params={"k": int(k)})
            return Outliers.of(response.json())
        return self._run(plan())

    def item(self, key: str) -> Item:
        """One stored item by key: mu and logvar as arrays, its ELBO terms, log p(x)."""
        def plan() -> Plan:
            response = yield Call("GET", self._path(f"items/{quote(str(key), safe='')}"))
            return build(Item, response.json())
        return self._run(plan())

    def export(self, path: str | Path, format: str = "parquet") -> Path:
        """Stream the whole set to a file, `parquet` or `ndjson` (bounded memory)."""
        if format not in ("parquet", "ndjson"):
            raise InvalidInput(f"format must be 'parquet' or 'ndjson'; got {format!r}")
        target = Path(path)

        def plan() -> Plan:
            # beside the target, renamed once whole; made with mode 0666 less the umask,
            # as a plain open() would (a NamedTemporaryFile is 0600), without touching
            # the process's umask
            part = target.parent / f".latentbank-{uuid.uuid4().hex}.part"
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with open(fd, "w+b") as sink:
                    yield Download(Call("GET", self._path("export"),
                                        params={"format": format}, timeout=None), sink)
                os.replace(part, target)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
            return target
        return self._run(plan())

    def to_arrow(self) -> Any:
        """The whole set as a pyarrow Table (streamed as Parquet): one row per item with
        index, key, label, mu, logvar, elbo, reconstruction, kl, log_px, log_px_se, ess.
        Needs pyarrow (`pip install 'latentbank-client[pandas]'`)."""
        pq = _arrow()

        def plan() -> Plan:
            with tempfile.TemporaryFile() as sink:
                yield Download(Call("GET", self._path("export"),
                                    params={"format": "parquet"}, timeout=None), sink)
                sink.seek(0)
                return pq.read_table(sink)
        return self._run(plan())

    def to_pandas(self) -> Any:
        """The whole set as a pandas DataFrame, one row per item (see `to_arrow`); `mu`
        and `logvar` hold one numpy array per row. Needs pandas and pyarrow."""
        pq = _arrow()
        try:
            import pandas  # noqa: F401
        except ImportError:
            raise LatentbankError("to_pandas needs pandas: pip install "
                                  "'latentbank-client[pandas]'") from None

        def plan() -> Plan:
            with tempfile.TemporaryFile() as sink:
                yield Download(Call("GET", self._path("export"),
                                    params={"format": "parquet"}, timeout=None), sink)
                sink.seek(0)
                return pq.read_table(sink).to_pandas()
        return self._run(plan())

    def projection(self, n: int = 2000) -> Projection:
        """2-D PCA of the posterior means of an even sample of `n` items."""
        def plan() -> Plan:
            response = yield Call("GET", self._path("projection"), params={"n": int(n)})
            return build(Projection, response.json())
        return self._run(plan())

    def latents_png(self) -> PNG:
        """The server's PNG of the latent means (first two principal components)."""
        def plan() -> Plan:
            response = yield Call("GET", self._path("plots/latent.png"))
            return PNG(response.content)
        return self._run(plan())

    def plot_latents(self, n: int = 2000) -> Any:
        """A matplotlib scatter of the set's projection coloured by label; without
        matplotlib, the server's PNG (`latents_png()`)."""
        if pyplot() is None:
            return self.latents_png()

        def plan() -> Plan:
            response = yield Call("GET", self._path("projection"), params={"n": int(n)})
            return latents_figure(build(Projection, response.json()))
        return self._run(plan())

    def delete(self) -> None:
        """Delete the set: its rows and its index."""
        return self._run(_delete(str(self.id)))

    def _repr_html_(self) -> str:
        stats = self.stats or {}
        figures = [(name.replace("_", " "), stats.get(name))
                   for name in ("mean_elbo", "mean_log_px", "knn_label_accuracy")
                   if isinstance(stats.get(name), int | float)]
        return html_table(f"latentbank embedding set {self.id}", [
            ("status", self.status), ("model", self.model_id), ("dataset", self.dataset_id),
            ("items", self.n_items), ("latent dim", self.dim),
            ("importance samples", self.importance_samples),
            ("index", f"{self.index_status} ({self.index_metric})"
                       f"{build_note(self.index_status, self.index_build)}"),
            *figures,
            ("ready", self.ready_at)])


def build_note(index_status: str | None, index_build: dict[str, Any] | None) -> str:
    """', 45 % (building index: loading tuples)' while the index is built; ', graph did
    not fit in memory' after a build that spilled to disk; else ''."""
    build = index_build or {}
    if index_status == "building" and "fraction" in build:
        return f", {100 * build['fraction']:.0f} % ({build.get('phase', '')})"
    if build.get("fits") is False:
        return ", graph did not fit in memory"
    return ""


def get_set(client: Any, embedding_set: Any) -> Plan:
    response = yield Call("GET", f"/v1/embeddings/{embedding_set}")
    return build(EmbeddingSet, response.json(), client)


LINKED["embedding_set_id"] = get_set


def _delete(embedding_set: str) -> Plan:
    yield Call("DELETE", f"/v1/embeddings/{embedding_set}")


class Embeddings(Resource):
    """`client.embeddings`: embed datasets, get (by id or '@alias'), list, delete sets."""

    def create(self, model: Any, dataset: Any, importance_samples: int | None = None, *,
               append_to: Any = None, vector_type: str | None = None,
               idempotency_key: str | None = None) -> Job:
        """Queue an embedding job: every item of `dataset` through `model` (an id, a
        Model or '@alias'). `importance_samples` K > 0 also stores log p(x) estimated
        with K samples (0: ELBO terms only). `append_to`: a ready set of the same model
        to grow. `vector_type` 'halfvec' stores the codes as float16 (half the disk;
        every read still answers float32), 'vector' as float32 (the server's default
        setting decides when not given). Sent with an Idempotency-Key, so retries never
        make two jobs."""
        if vector_type is not None and vector_type not in VECTOR_TYPES:
            raise InvalidInput(f"vector_type must be one of {', '.join(VECTOR_TYPES)}; got "
                               f"{vector_type!r}")
        if importance_samples is not None and (
                not isinstance(importance_samples, int | np.integer) or importance_samples < 0):
            raise InvalidInput("importance_samples must be a non-negative integer; got "
                               f"{importance_samples!r}")
        model_ref = ref(model, "model")
        body: dict[str, Any] = {"model_id": int(model_ref) if model_ref.isdigit() else model_ref,
                                "dataset_id": ident(dataset, "dataset")}
        if importance_samples is not None:
            body["importance_samples"] = int(importance_samples)
        if append_to is not None:
            target = ref(append_to, "append_to")
            body["embedding_set_id"] = int(target) if target.isdigit() else target
        if vector_type is not None:
            body["vector_type"] = vector_type

        def plan() -> Plan:
            response = yield Call("POST", "/v1/embedding-jobs", json=body,
                                  headers=submission(None, idempotency_key))
            return build(Job, response.json(), self._client)
        return self._run(plan())

    def get(self, embedding_set: Any) -> EmbeddingSet:
        """One embedding set by id or '@alias'."""
        return self._run(get_set(self._client, ref(embedding_set, "embedding_set")))

    def __getitem__(self, embedding_set: Any) -> EmbeddingSet:
        return self.get(embedding_set)

    def list(self, model_id: int | None = None, status: str | None = None, limit: int = 100,
             offset: int = 0) -> list[EmbeddingSet]:
        """Embedding sets, newest first, optionally of one model or status."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/embeddings", params={
                "model_id": model_id, "status": status, "limit": limit, "offset": offset})
            return [build(EmbeddingSet, e, self._client) for e in response.json()]
        return self._run(plan())

    def delete(self, embedding_set: Any) -> None:
        """Delete an embedding set (by id or '@alias')."""
        return self._run(_delete(ref(embedding_set, "embedding_set")))
