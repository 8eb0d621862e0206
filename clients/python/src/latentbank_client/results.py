"""Typed results built from the API's JSON, tolerant of fields they do not know.

Each dataclass mirrors one response schema of the server's OpenAPI (named in its
docstring); tests/client/test_drift.py checks that every field here exists there."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

T = TypeVar("T")


class FromApi:
    """A result built from an answer of the API. `raw` is that answer's JSON as it came,
    fields this client does not know included (what `latentbank ... --json` prints)."""

    _raw: Any = None

    @property
    def raw(self) -> Any:
        """The API's JSON this result was built from (None when built otherwise)."""
        return self._raw


def parse_time(value: Any) -> Any:
    """An ISO-8601 timestamp as a datetime (None and non-strings as they are)."""
    if not isinstance(value, str):
        return value
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value


def build(cls: type[T], data: dict[str, Any], client: Any = None) -> T:
    """An instance of dataclass `cls` from `data`: unknown keys are dropped, missing ones
    take their defaults; `*_at` fields become datetimes, `ARRAYS` fields numpy arrays."""
    if not isinstance(data, dict):
        raise TypeError(f"{cls.__name__} expects a JSON object; got {type(data).__name__}")
    arrays = getattr(cls, "ARRAYS", {})
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name.startswith("_") or f.name not in data:
            continue
        value = data[f.name]
        if f.name.endswith("_at") or f.name == "at":
            value = parse_time(value)
        elif f.name in arrays and value is not None:
            value = np.asarray(value, dtype=arrays[f.name])
        values[f.name] = value
    obj = cls(**values)
    if client is not None and hasattr(obj, "_client"):
        obj._client = client  # type: ignore[attr-defined]
    if isinstance(obj, FromApi):
        obj._raw = data
    return obj


@dataclass(kw_only=True)
class Hit(FromApi):
    """One neighbour or outlier (server schema HitOut)."""

    key: str
    index: int
    label: str | None = None
    distance: float | None = None
    elbo: float | None = None
    log_px: float | None = None
    metadata: dict[str, Any] | None = None


class SearchResult(FromApi, list):  # type: ignore[type-arg]
    """The hits of one query, nearest first (server schema SearchOut / BatchAnswer):
    a list of `Hit`, with the `plan` the database used and, for a key query of a batch
    search, the `query` item itself."""

    plan: str | None = None
    query: dict[str, Any] | None = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> SearchResult:
        out = cls(build(Hit, h) for h in data.get("results", []))
        out.plan, out.query = data.get("plan"), data.get("query")
        out._raw = data
        return out


class Outliers(FromApi, list):  # type: ignore[type-arg]
    """The items of lowest log p(x) (or ELBO), a list of `Hit` (server schema
    OutliersOut); `ranked_by` says which figure ranked them."""

    ranked_by: str | None = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> Outliers:
        out = cls(build(Hit, h) for h in data.get("results", []))
        out.ranked_by = data.get("ranked_by")
        out._raw = data
        return out


@dataclass(kw_only=True)
class DatasetItems(FromApi):
    """A page of a dataset's items (server schema DatasetItemsOut): `x` (n, *item_shape)
    float32 values as stored (8-bit items as x / 255), with their keys and labels."""

    ARRAYS: ClassVar[dict[str, Any]] = {"x": np.float32}
    dataset_id: int
    offset: int = 0
    n: int = 0
    item_shape: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    x: np.ndarray | None = None


@dataclass(kw_only=True)
class Item(FromApi):
    """One stored item's latent code and ELBO terms (server schema ItemOut)."""

    ARRAYS: ClassVar[dict[str, Any]] = {"mu": np.float32, "logvar": np.float32}
    index: int
    key: str
    label: str | None = None
    metadata: dict[str, Any] | None = None
    mu: np.ndarray | None = None
    logvar: np.ndarray | None = None
    elbo: float | None = None
    reconstruction: float | None = None
    kl: float | None = None
    log_px: float | None = None
    log_px_se: float | None = None
    ess: float | None = None


@dataclass(kw_only=True)
class Threshold(FromApi):
    """The held-out threshold a score was judged by (server schema ScoreThreshold)."""

    fpr: float
    value: float
    statistic: str
    importance_samples: int | None = None
    heldout_items: int | None = None
    split: str | None = None
    note: str | None = None


@dataclass(kw_only=True)
class Scores(FromApi):
    """Per-item figures of new items, numpy arrays (server schema ScoreOut): `elbo`,
    `reconstruction`, `kl`, and with K > 0 `log_px`, `log_px_se`, `ess`; with `fpr`,
    `threshold` and the boolean `is_outlier`."""

    ARRAYS: ClassVar[dict[str, Any]] = {
        "elbo": np.float64, "reconstruction": np.float64, "kl": np.float64,
        "elbo_se": np.float64, "log_px": np.float64, "log_px_se": np.float64,
        "ess": np.float64, "bits_per_dim": np.float64, "is_outlier": np.bool_}
    n_items: int
    importance_samples: int = 0
    elbo: np.ndarray | None = None
    reconstruction: np.ndarray | None = None
    kl: np.ndarray | None = None
    elbo_se: np.ndarray | None = None
    log_px: np.ndarray | None = None
    log_px_se: np.ndarray | None = None
    ess: np.ndarray | None = None
    likelihood_kind: str | None = None
    bits_per_dim: np.ndarray | None = None
    logits_source: str | None = None
    threshold: Threshold | None = None
    is_outlier: np.ndarray | None = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> Scores:
        scores = build(cls, data)
        if isinstance(data.get("threshold"), dict):
            scores.threshold = build(Threshold, data["threshold"])
        return scores


@dataclass(kw_only=True)
class Encoded(FromApi):
    """Posterior means and log-variances, (n, latent_dim) each (server schema EncodeOut)."""

    ARRAYS: ClassVar[dict[str, Any]] = {"mu": np.float32, "logvar": np.float32}
    mu: np.ndarray
    logvar: np.ndarray


@dataclass(kw_only=True)
class Sample(FromApi):
    """Decoded items `x` (item-shaped) and the latent points `z` they came from (server
    schema SampleOut)."""

    ARRAYS: ClassVar[dict[str, Any]] = {"x": np.float32, "z": np.float32}
    x: np.ndarray
    z: np.ndarray


@dataclass(kw_only=True)
class Traversal(FromApi):
    """A latent traversal (server schema TraverseOut): `x` has len(dims) x steps items,
    row r of the grid moving dimension dims[r] by each of `offsets`."""

    ARRAYS: ClassVar[dict[str, Any]] = {"x": np.float32, "z": np.float32, "kl": np.float64,
                                        "offsets": np.float64}
    x: np.ndarray
    z: np.ndarray
    dims: list[int] = field(default_factory=list)
    kl: np.ndarray | None = None
    offsets: np.ndarray | None = None


@dataclass(kw_only=True)
class MetricRow(FromApi):
    """One epoch's figures of one split, nats per item (server schema MetricRow)."""

    epoch: int
    split: str
    elbo: float
    reconstruction: float
    kl: float
    log_px: float | None = None
    log_px_se: float | None = None
    ess: float | None = None
    importance_samples: int | None = None
    loss: float | None = None
    beta: float | None = None
    lr: float | None = None
    active_units: int | None = None
    seconds: float | None = None


@dataclass(kw_only=True)
class Projection(FromApi):
    """2-D PCA of an even sample of a set's posterior means (server schema ProjectionOut);
    `points` is (n, 2)."""

    ARRAYS: ClassVar[dict[str, Any]] = {"points": np.float64, "explained_variance": np.float64}
    set_id: int
    n_items: int
    keys: list[str] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    points: np.ndarray | None = None
    explained_variance: np.ndarray | None = None
    elbo: list[float] = field(default_factory=list)
    log_px: list[float | None] = field(default_factory=list)


@dataclass(kw_only=True)
class AliasEvent(FromApi):
    """One change of an alias (server schema AliasEventOut)."""

    action: str
    kind: str
    target_id: int | None = None
    previous_id: int | None = None
    key_id: int | None = None
    at: dt.datetime | None = None


@dataclass(kw_only=True)
class Alias(FromApi):
    """A name for a model or an embedding set (server schema AliasOut); use it as
    '@name' wherever an id goes."""

    name: str
    kind: str
    target_id: int
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None
    history: list[AliasEvent] = field(default_factory=list)
    # not a field of the API's answer: `Aliases.set` says whether its call made the
    # alias (201) rather than moved or kept it (200); None elsewhere
    created = None

    @classmethod
    def of(cls, data: dict[str, Any]) -> Alias:
        alias = build(cls, data)
        alias.history = [build(AliasEvent, e) for e in data.get("history") or []]
        return alias


@dataclass(kw_only=True)
class ApiKey(FromApi):
    """An API key's record, never its secret (server schema KeyOut)."""

    id: int
    name: str
    prefix: str
    scopes: list[str] = field(default_factory=list)
    created_at: dt.datetime | None = None
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None


@dataclass(kw_only=True)
class CreatedKey(ApiKey):
    """A new key with its secret `key`, shown only this once (server schema
    CreatedKeyOut)."""

    key: str = field(default="", repr=False)


@dataclass(kw_only=True)
class WhoAmI(FromApi):
    """The calling key and its scopes (server schema WhoAmIOut)."""

    key_id: int
    scopes: list[str] = field(default_factory=list)
