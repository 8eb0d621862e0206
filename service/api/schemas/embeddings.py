"""Embedding sets: items, searches (single and batch), outliers, projections."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import Metric
from store.tables import EmbeddingSet


class EmbeddingSetOut(BaseModel):
    id: int
    model_id: int
    dataset_id: int
    status: str
    dim: int
    n_items: int
    importance_samples: int
    index_status: str
    index_metric: str
    vector_type: str = Field(description="how the set stores its latents: 'vector' "
                                         "(float32) or 'halfvec' (float16)")
    index_build: dict[str, Any] | None = Field(
        None, description="the HNSW build as it runs and as it ended: phase, tuples_done, "
                          "fraction (0-1), workers (parallel workers asked for, besides the "
                          "leader), workers_launched (those PostgreSQL started), memory_mb "
                          "given, needed_mb by the graph, predicted_fits, fits (false: the "
                          "graph outgrew its memory after spilled_after tuples and was "
                          "built partly on disk), seconds, index_mb once built, "
                          "vacuum_seconds (the partition's VACUUM (ANALYZE) before the "
                          "build, phase 'vacuuming the new rows' while it runs)")
    stats: dict[str, Any] | None = None
    created_at: dt.datetime
    ready_at: dt.datetime | None = None

    @classmethod
    def of(cls, e: EmbeddingSet) -> EmbeddingSetOut:
        return cls(id=e.id, model_id=e.model_id, dataset_id=e.dataset_id, status=e.status,
                   dim=e.dim, n_items=e.n_items, importance_samples=e.importance_samples,
                   index_status=e.index_status, index_metric=e.index_metric,
                   vector_type=e.vector_type, index_build=e.index_build, stats=e.stats,
                   created_at=e.created_at, ready_at=e.ready_at)


class ItemOut(BaseModel):
    index: int
    key: str
    label: str | None = None
    metadata: dict[str, Any] | None = None
    mu: list[float]
    logvar: list[float]
    elbo: float
    reconstruction: float
    kl: float
    log_px: float | None = None
    log_px_se: float | None = Field(None, description="Monte-Carlo standard error of log_px")
    ess: float | None = Field(None, description="the importance weights' effective sample "
                                                "size (1 to the set's importance_samples)")


class SearchFilterIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | list[str] | None = None
    metadata: dict[str, Any] | None = None
    elbo: tuple[float | None, float | None] | None = None
    log_px: tuple[float | None, float | None] | None = None


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"key": "17", "k": 5},
        {"vector": [0.1, -0.3, 0.7, 0.0, 1.2, -0.5, 0.2, 0.9], "k": 10, "metric": "cosine",
         "filter": {"label": ["3", "8"], "elbo": [-40, None]}}]})

    vector: list[float] | None = Field(None, max_length=65536)
    key: str | None = Field(None, max_length=1000)
    k: int = Field(10, ge=1, le=1000)
    metric: Metric = "l2"
    exact: bool = False
    filter: SearchFilterIn | None = None


class BatchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vector: list[float] | None = Field(None, max_length=65536)
    key: str | None = Field(None, max_length=1000)


class BatchSearchRequest(BaseModel):
    """Many queries with one k, metric and filter: one request, one database round trip."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"queries": [{"key": "17"}, {"key": "18"}, {"vector": [0.1, -0.3, 0.7, 0.0]}],
         "k": 5, "filter": {"label": ["3", "8"]}}]})

    queries: list[BatchQuery] = Field(min_length=1, max_length=10_000, description=(
        "each a vector or a stored item's key (the item itself is left out of its "
        "answer); at most LATENTBANK_SEARCH_MAX_QUERIES"))
    k: int = Field(10, ge=1, le=1000)
    metric: Metric = "l2"
    exact: bool = False
    filter: SearchFilterIn | None = None


class HitOut(BaseModel):
    key: str
    index: int
    label: str | None = None
    distance: float | None = None
    elbo: float
    log_px: float | None = None
    metadata: dict[str, Any] | None = None


class SearchOut(BaseModel):
    results: list[HitOut]
    plan: str = Field(description="'exact', 'hnsw(ef=N)', 'hnsw-iterative(ef=N)' (filtered, "
                                  "pgvector >= 0.8) or 'exact (after ...)' when the index "
                                  "came back short of k")


class QueryItem(BaseModel):
    key: str
    index: int
    label: str | None = None


class BatchAnswer(SearchOut):
    query: QueryItem | None = Field(None, description="a key query's own item")


class BatchSearchOut(BaseModel):
    answers: list[BatchAnswer] = Field(description="one per query, in the queries' order")


class OutliersOut(BaseModel):
    results: list[HitOut]
    ranked_by: Literal["log_px", "elbo"]


class ProjectionOut(BaseModel):
    set_id: int
    n_items: int = Field(description="the set's items; `keys` holds an even sample of them")
    keys: list[str]
    labels: list[str | None]
    points: list[tuple[float, float]] = Field(
        description="2-D PCA of the posterior means mu of the sample")
    explained_variance: list[float] = Field(
        description="share of mu's variance along each of the two axes")
    elbo: list[float]
    log_px: list[float | None]
