"""Request and response bodies of the HTTP API (DESIGN.md, "Shapes the clients rely on")."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from store.tables import ApiKey, Dataset, EmbeddingSet, Job, Model

Metric = Literal["l2", "cosine"]
MAX_ID = 2**63 - 1  # PostgreSQL bigint
# an id, or "@name" for an alias (store.aliases), wherever a body names a model or set
Ref = Annotated[int, Field(ge=1, le=MAX_ID)] | Annotated[
    str, Field(pattern=r"^@[a-z][a-z0-9_.-]{0,62}$", description="@name: an alias")]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_input"])
    message: str = Field(examples=["model.latent_dim: Input should be greater than 0"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class DatasetOut(BaseModel):
    id: int
    name: str
    n_items: int
    item_shape: list[int]
    dtype: str
    source_dtype: str
    source_format: str
    has_labels: bool
    size_bytes: int
    min_value: float
    max_value: float
    checksum: str
    source_uri: str | None = None
    created_at: dt.datetime
    mode: Literal["sync"] | None = Field(
        None, description="on a registration: `sync`, registered inside the request (an "
                          "ingest job answers 202 with `mode: job` instead)")
    ingest: dict[str, Any] | None = Field(
        None, description="how the items were read: `format`, `options`, `image` (the "
                          "transform a query image goes through: color, size) and `report` "
                          "(items read, failed, skipped, and the first failures: key and "
                          "reason)")

    @classmethod
    def of(cls, d: Dataset) -> DatasetOut:
        source = d.source_uri
        if source and not source.startswith("builtin:"):
            source = "path:" + source.rsplit("/", 1)[-1]  # never the server's folders
        return cls(id=d.id, name=d.name, n_items=d.n_items, item_shape=list(d.item_shape),
                   dtype=d.dtype, source_dtype=d.source_dtype, source_format=d.source_format,
                   has_labels=d.has_labels, size_bytes=d.size_bytes, min_value=d.min_value,
                   max_value=d.max_value, checksum=d.checksum, source_uri=source,
                   created_at=d.created_at, ingest=d.ingest)


class DatasetItemsOut(BaseModel):
    dataset_id: int
    offset: int
    n: int
    item_shape: list[int]
    keys: list[str]
    labels: list[str | None]
    x: list[Any] = Field(description="the items' stored values (float32), item-shaped")


class WhoAmIOut(BaseModel):
    key_id: int
    scopes: list[Literal["read", "write", "admin"]] = Field(
        description="what this key may do (a higher scope includes the lower ones)")


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


class DatasetByReference(BaseModel):
    """Register a source already on the server (a file or folder under an allowed root, or
    an object under an allowed URL: an ingest job, 202) or a builtin (in the request)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"name": "digits", "builtin": "digits"},
                     {"name": "mnist-train", "uri": "/data/mnist/train.npy"},
                     {"name": "photos", "uri": "s3://bucket/photos/", "image_size": 32,
                      "color": "rgb"}]})

    name: str = Field(min_length=1, max_length=200)
    uri: str | None = Field(None, max_length=4096)
    builtin: Literal["digits"] | None = None
    array: str | None = Field(None, max_length=200, description=".npz member holding the data")
    key_column: str | None = Field(None, max_length=200)
    label_column: str | None = Field(None, max_length=200)
    feature_columns: list[str] | None = None
    metadata_columns: list[str] | None = None
    format: str | None = Field(None, max_length=40, description="default: told by the "
                               "extension or contents (npy npz parquet csv images zip tar "
                               "webdataset image-parquet idx)")
    image_size: int | str | list[int] | None = Field(
        None, description="resize + centre crop: N, \"HxW\" or [H, W]; default: each "
                          "image's own size")
    color: str | None = Field(None, max_length=10, description="grey or rgb (default)")
    image_column: str | None = Field(None, max_length=200,
                                     description="parquet: the column of images")
    max_failure_share: float | None = Field(
        None, description="refuse the source when more than this share of its items "
                          "cannot be read (default: LATENTBANK_INGEST_MAX_FAILURE_SHARE)")

    def options(self) -> dict[str, Any]:
        """The reading options given (see ingest.requests.FIELDS)."""
        return self.model_dump(exclude={"name", "uri", "builtin"}, exclude_none=True)


class JobOut(BaseModel):
    id: int
    kind: str = Field(examples=["train"])
    status: str = Field(examples=["running"])
    progress: float = Field(ge=0, le=1, examples=[0.42])
    progress_message: str | None = None
    eta_seconds: float | None = None
    items_done: int = Field(0, description="the attempt's work done: epochs recorded "
                                           "(training), items embedded (embedding), items "
                                           "read (ingest; `progress` is its bytes read)")
    items_total: int | None = Field(None, description="of how many (null before a start)")
    attempts: int
    max_attempts: int
    error: str | None = None
    cancel_requested: bool
    model_id: int | None = None
    embedding_set_id: int | None = None
    dataset_id: int | None = Field(None, description="the dataset an ingest job registered "
                                                     "(once it succeeded)")
    sweep_id: str | None = None
    params: dict[str, Any]
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    published: bool

    @classmethod
    def of(cls, j: Job) -> JobOut:
        return cls(id=j.id, kind=j.kind, status=j.status, progress=min(max(j.progress, 0), 1),
                   progress_message=j.progress_message, eta_seconds=j.eta_seconds,
                   items_done=j.items_done or 0, items_total=j.items_total,
                   attempts=j.attempts, max_attempts=j.max_attempts, error=j.error,
                   cancel_requested=j.cancel_requested, model_id=j.model_id,
                   embedding_set_id=j.embedding_set_id, dataset_id=j.dataset_id,
                   sweep_id=j.sweep_id, params=_public_params(j),
                   created_at=j.created_at, started_at=j.started_at,
                   finished_at=j.finished_at, published=j.published_at is not None)


def _public_params(j: Job) -> dict[str, Any]:
    """A job's parameters as users see them: an ingest job's saved upload by its file
    name only (never the store's keys)."""
    if j.kind != "ingest":
        return j.params
    hidden = ("upload_key", "upload_folder", "keys_key", "labels_key")
    return {k: v for k, v in j.params.items() if k not in hidden}


class IngestAccepted(BaseModel):
    """A registration that runs as an ingest job (202): follow `job` (Location: the job);
    `job.dataset_id` names the dataset once it succeeded."""

    mode: Literal["job"] = "job"
    job: JobOut
    dataset: DatasetOut | None = None


class TrainingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset_id": 1,
        "model": {"family": "mlp", "latent_dim": 8, "hidden": [256, 128],
                  "likelihood": "bernoulli", "beta": 1.0},
        "training": {"epochs": 20, "batch_size": 128, "lr": 0.001, "seed": 0,
                     "val_fraction": 0.1, "importance_samples": 100}}]})

    dataset_id: int = Field(ge=1, le=MAX_ID)
    model: dict[str, Any] = Field(description="models.config.VAEConfig fields (see README)")
    training: dict[str, Any] = Field(default_factory=dict,
                                     description="models.config.TrainConfig fields")


class SweepRequest(TrainingRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "dataset_id": 1, "model": {"family": "mlp", "latent_dim": 8},
        "training": {"epochs": 10}, "grid": {"model.latent_dim": [2, 8], "model.beta": [1, 4]}}]})

    grid: dict[str, list[Any]] = Field(description="'model.<field>' or 'training.<field>' "
                                                   "to the values to try")


class SweepOut(BaseModel):
    sweep_id: str
    jobs: list[JobOut]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": 1, "dataset_id": 1, "importance_samples": 100}]})

    model_id: Ref
    dataset_id: int = Field(ge=1, le=MAX_ID)
    importance_samples: int | None = Field(
        None, ge=0, le=100_000, description="0 (the default): ELBO terms only; K > 0: also "
                                            "log p(x). An append takes the set's K")
    embedding_set_id: Ref | None = Field(
        None, description="append the dataset's items to this ready set of the same model "
                          "(keys must stay unique in the set: 409 naming clashes)")


class ModelOut(BaseModel):
    id: int
    dataset_id: int
    status: str
    config: dict[str, Any]
    summary: dict[str, Any] | None = None
    sweep_id: str | None = None
    encoder_sha256: str | None = None
    decoder_sha256: str | None = None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, m: Model) -> ModelOut:
        summary = m.summary
        if summary and "heldout_quantiles" in summary:
            # 2 x 1001 numbers that /score reads; a model's answer names a few thresholds
            quantiles = summary["heldout_quantiles"]
            levels, values = quantiles["levels"], quantiles["values"]
            summary = {k: v for k, v in summary.items() if k != "heldout_quantiles"} | {
                "heldout_thresholds": {
                    "statistic": quantiles["statistic"],
                    "importance_samples": quantiles["importance_samples"],
                    # val_fraction = 0: the "held-out" items are the training rows
                    "split": "training" if summary.get("heldout_split") == "train"
                    else "validation",
                    "by_fpr": {str(f): values[levels.index(f)]
                               for f in (0.001, 0.01, 0.05, 0.1) if f in levels}}}
        return cls(id=m.id, dataset_id=m.dataset_id, status=m.status, config=m.config,
                   summary=summary, sweep_id=m.sweep_id, encoder_sha256=m.encoder_sha256,
                   decoder_sha256=m.decoder_sha256, created_at=m.created_at,
                   updated_at=m.updated_at)


class MetricRow(BaseModel):
    epoch: int
    split: str
    elbo: float
    reconstruction: float
    kl: float
    log_px: float | None = None
    log_px_se: float | None = Field(
        None, description="Monte-Carlo standard error of the mean log p(x) over the split")
    ess: float | None = Field(None, description="the importance weights' mean effective "
                                                "sample size (1 to importance_samples)")
    importance_samples: int
    loss: float | None = None
    beta: float
    lr: float
    active_units: int | None = None
    seconds: float


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
    stats: dict[str, Any] | None = None
    created_at: dt.datetime
    ready_at: dt.datetime | None = None

    @classmethod
    def of(cls, e: EmbeddingSet) -> EmbeddingSetOut:
        return cls(id=e.id, model_id=e.model_id, dataset_id=e.dataset_id, status=e.status,
                   dim=e.dim, n_items=e.n_items, importance_samples=e.importance_samples,
                   index_status=e.index_status, index_metric=e.index_metric, stats=e.stats,
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


class DecodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"z": [[0.0, 0.5, -1.0, 0.2, 0.0, 0.1, 0.3, -0.4]]}]})

    z: list[list[float]] | list[float]


class ArrayOut(BaseModel):
    x: list[Any] = Field(description="the decoder's mean, one item per row, item-shaped")


class SampleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"n": 16, "seed": 0, "temperature": 1.0}]})

    n: int = Field(16, ge=1, le=4096)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    temperature: float = Field(1.0, gt=0, le=10)


class SampleOut(ArrayOut):
    z: list[list[float]]


class InterpolateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"embedding_id": 1, "from_key": "0", "to_key": "42", "steps": 8,
         "method": "slerp"}]})

    z_from: list[float] | None = Field(None, max_length=65536)
    z_to: list[float] | None = Field(None, max_length=65536)
    embedding_id: Ref | None = Field(None)
    from_key: str | None = Field(None, max_length=1000)
    to_key: str | None = Field(None, max_length=1000)
    steps: int = Field(8, ge=2, le=256)
    method: Literal["linear", "slerp"] = "linear"


class TraverseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"embedding_id": 1, "key": "42", "top": 4, "steps": 9, "span": 3.0}]})

    z: list[float] | None = Field(None, max_length=65536,
                                  description="the base point (default: the prior mean, 0)")
    embedding_id: Ref | None = Field(None,
                                     description="with 'key': the base is that item's mu")
    key: str | None = Field(None, max_length=1000)
    dims: list[int] | None = Field(None, min_length=1, max_length=256,
                                   description="the dimensions to move (default: 'top')")
    top: int = Field(8, ge=1, le=256, description="the dimensions with the most held-out KL")
    steps: int = Field(9, ge=2, le=64)
    span: float = Field(3.0, gt=0, le=100, description="each dimension moves from base - span "
                                                       "to base + span (prior units)")


class TraverseOut(SampleOut):
    dims: list[int] = Field(description="one row of the grid each, most held-out KL first")
    kl: list[float | None] = Field(description="each dimension's held-out KL (nats)")
    offsets: list[float] = Field(description="one column each: added to the base's value")


class EncodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"x": [[0.0] * 64]}]})

    x: list[Any] = Field(description="items, each of the model's item shape or flat")


class EncodeOut(BaseModel):
    mu: list[list[float]]
    logvar: list[list[float]]


class ScoreThreshold(BaseModel):
    fpr: float = Field(description="the false-positive rate asked for")
    value: float = Field(description="items whose statistic lies below it are outliers")
    statistic: Literal["log_px", "elbo"] = Field(
        description="what it bounds: log p(x) (with the held-out K) or, for a model "
                    "evaluated without importance samples, the ELBO")
    importance_samples: int = Field(description="K of the held-out figures it was taken from "
                                                "(with fpr, /score takes no other K)")
    heldout_items: int = Field(description="held-out items it was calibrated on")
    split: Literal["validation", "training"] = Field(
        description="where those items came from: the validation split, or the training "
                    "rows of a model trained with val_fraction = 0 (items the model has seen "
                    "score higher than new ones, so more than fpr are flagged)")
    note: str | None = Field(None, description="what to know about this threshold")


class ScoreOut(BaseModel):
    n_items: int
    importance_samples: int = Field(description="K: log p(x) and the ELBO terms average "
                                                "max(1, K) posterior draws")
    elbo: list[float] = Field(description="per item, nats (higher is better)")
    reconstruction: list[float]
    kl: list[float] = Field(description="closed form: no Monte-Carlo error")
    elbo_se: list[float] | None = Field(
        None, description="Monte-Carlo standard error of the ELBO (with K >= 2)")
    log_px: list[float] | None = Field(None, description="importance-sampled (K > 0)")
    log_px_se: list[float] | None = Field(
        None, description="its Monte-Carlo standard error, from the importance weights")
    ess: list[float] | None = Field(
        None, description="effective sample size of the importance weights (1 to K)")
    likelihood_kind: Literal["discrete", "density", "unnormalised"] = Field(
        description="which figure log p(x) and the ELBO are: 'discrete' (log-probability of "
                    "binary, binarised, dequantised integer or discretised-logistic "
                    "8-bit data; bits/dim apply), "
                    "'density' (of continuous data), 'unnormalised' (a Bernoulli decoder on "
                    "grey items: no likelihood)")
    bits_per_dim: list[float] | None = Field(
        None, description="-log p(x) / (D ln 2) (the ELBO's when K = 0): 'discrete' only")
    logits_source: Literal["exported", "recovered", "floored"] | None = Field(
        None, description="(continuous) Bernoulli decoders: 'exported', the decoder file's "
                          "own logits (the figures match torch's for any logit); "
                          "'recovered', a continuous-Bernoulli file exported before logits "
                          "were: each logit l is solved from the exported mean, within "
                          "about 3e-8 l^2; 'floored', a Bernoulli file exported before "
                          "logits were: probabilities are floored at 2^-24, so a value the "
                          "decoder is surer of than |l| = 16.6 counts at most 16.6 nats "
                          "(export the model again for exact figures). None: Gaussian")
    threshold: ScoreThreshold | None = None
    is_outlier: list[bool] | None = None


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": 3}, {"embedding_set_id": 7}]})

    model_id: int | None = Field(None, ge=1, le=MAX_ID)
    embedding_set_id: int | None = Field(None, ge=1, le=MAX_ID)


class AliasEventOut(BaseModel):
    action: Literal["created", "moved", "deleted"]
    kind: Literal["model", "embedding_set"]
    target_id: int | None = Field(description="where the alias points after the change")
    previous_id: int | None = Field(description="where it pointed before")
    key_id: int | None = Field(description="the API key that made the change")
    at: dt.datetime


class AliasOut(BaseModel):
    name: str
    kind: Literal["model", "embedding_set"]
    target_id: int
    created_at: dt.datetime
    updated_at: dt.datetime
    history: list[AliasEventOut] = Field(description="every change, oldest first (including "
                                                     "those before a delete of the name)")


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "ci-pipeline", "scopes": ["read", "write"]}]})

    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: dt.datetime | None = None
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(id=k.id, name=k.name, prefix=k.prefix, scopes=list(k.scopes),
                   created_at=k.created_at, last_used_at=k.last_used_at,
                   revoked_at=k.revoked_at)


class CreatedKeyOut(KeyOut):
    key: str = Field(description="the secret; shown only in this answer")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
