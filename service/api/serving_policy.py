"""What the serving routes may do with a model, decided in one place: a ready model, an
item of one of its own embedding sets, the bounds of a traversal, and /score's limits and
held-out threshold."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from service.api.arrays import as_vector, check_answer, item_values
from service.api.deps import Services, in_thread
from service.api.schemas.serving import InterpolateRequest, TraverseRequest
from service.api.scoring import Scores, threshold_at
from store import registry
from store.aliases import resolve
from store.db import Database
from store.embedding_sets import get_set
from store.errors import Conflict, InvalidInput, TooLarge
from store.retrieval import get_item
from store.settings import Settings
from store.tables import Model

MAX_IMPORTANCE_SAMPLES = 5000
TRAINING_SPLIT_NOTE = ("the model was trained with val_fraction = 0, so its threshold comes "
                       "from the items it was trained on: new items score lower than those "
                       "and are flagged more often than fpr")
BULK = ("; score more with an embedding job (POST /v1/embedding-jobs), which stores the "
        "same figures for every item of a dataset")


def _ready(svc: Services, model_id: int, db: Database | None = None) -> Model:
    db = db or svc.db
    model = registry.get_model(db, model_id)
    if model.status != "ready":
        raise Conflict(f"model {model_id} is {model.status}, not ready")
    if db is svc.db:  # a replica's row may trail a deletion by seconds: not cached
        svc.ready_models.put(model_id, model)
    return model


async def ready_model(svc: Services, model_id: int, replica: bool = False) -> Model:
    """The model, which must be ready (409): from the cache of ready models, else read
    (with `replica`, as searches read: from a replica within the lag bound)."""
    cached = svc.ready_models.get(model_id)
    if cached is not None:
        return cached
    if replica:
        return await in_thread(svc.reads.run, lambda db: _ready(svc, model_id, db))
    return await in_thread(_ready, svc, model_id)


def own_set(svc: Services, model: Model, set_ref: int | str) -> int:
    """The id of an embedding set (an id or @alias) that `model` made: a set of another
    model is refused (its latent space is another)."""
    es = get_set(svc.db, resolve(svc.db, set_ref, "embedding_set"))
    if es.model_id != model.id:
        raise InvalidInput(f"embedding set {es.id} was made by model {es.model_id}, "
                           f"not by model {model.id}")
    return es.id


def interpolation_ends(svc: Services, model: Model, body: InterpolateRequest,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The path's two ends: two vectors, or two stored items of one of the model's sets."""
    by_vector = body.z_from is not None or body.z_to is not None
    by_key = body.from_key is not None or body.to_key is not None
    if by_vector == by_key or (by_vector and (body.z_from is None or body.z_to is None)) or (
            by_key and (body.from_key is None or body.to_key is None
                        or body.embedding_id is None)):
        raise InvalidInput("give either 'z_from' and 'z_to', or 'embedding_id' with "
                           "'from_key' and 'to_key'")
    if by_key:
        set_id = own_set(svc, model, body.embedding_id)  # type: ignore[arg-type]
        return (get_item(svc.db, set_id, body.from_key)["mu"],  # type: ignore[arg-type]
                get_item(svc.db, set_id, body.to_key)["mu"])  # type: ignore[arg-type]
    dim = model.config["model"]["latent_dim"]
    ends = [as_vector(v, dim, name).astype(np.float32)
            for v, name in ((body.z_from, "z_from"), (body.z_to, "z_to"))]
    return ends[0], ends[1]


def _traversal_dims(model: Model, body: TraverseRequest) -> tuple[list[int], Any]:
    """The dimensions to move (given, else the most held-out KL first) and the KL per
    dimension (None when the model has none)."""
    dim = model.config["model"]["latent_dim"]
    kl = (model.summary or {}).get("kl_per_dim")
    if body.dims is not None:
        bad = [d for d in body.dims if not 0 <= d < dim]
        if bad:
            raise InvalidInput(f"'dims' must lie in [0, {dim}); got {bad[:5]}")
        return list(body.dims), kl
    order = np.argsort(-np.asarray(kl), kind="stable") if kl else np.arange(dim)
    return [int(d) for d in order[:body.top]], kl


def traversal(svc: Services, model: Model, body: TraverseRequest,
              ) -> tuple[np.ndarray, list[int], list[float | None], np.ndarray]:
    """The traversal's latent grid (dims x steps rows), its dimensions, their KL, offsets;
    refused before anything is built or read when its rows (repeated dimensions count) or
    its answer's values pass their limits."""
    dim = model.config["model"]["latent_dim"]
    if body.z is not None and (body.embedding_id is not None or body.key is not None):
        raise InvalidInput("give the base as 'z', or as 'embedding_id' with 'key', not both")
    if (body.embedding_id is None) != (body.key is None):
        raise InvalidInput("'embedding_id' and 'key' go together")
    dims, kl = _traversal_dims(model, body)
    rows, limits = len(dims) * body.steps, svc.settings
    if rows > limits.decode_max_rows:
        raise InvalidInput(f"the traversal is {len(dims)} dims x {body.steps} steps = {rows} "
                           "rows (a repeated dimension counts each time); the limit is "
                           f"{limits.decode_max_rows} (LATENTBANK_DECODE_MAX_ROWS)")
    check_answer(rows, item_values(model.config["model"]) + dim, limits.max_response_values,
                 "traverse")
    if body.key is not None:
        set_id = own_set(svc, model, body.embedding_id)  # type: ignore[arg-type]
        base = get_item(svc.db, set_id, body.key)["mu"].astype(np.float64)
    elif body.z is not None:
        base = as_vector(body.z, dim, "z")
    else:
        base = np.zeros(dim)
    offsets = np.linspace(-body.span, body.span, body.steps)
    z = np.repeat(base[None], rows, axis=0)
    for row, d in enumerate(dims):
        z[row * body.steps:(row + 1) * body.steps, d] += offsets
    return z.astype(np.float32), dims, [kl[d] if kl else None for d in dims], offsets


def _threshold_draws(quantiles: dict[str, Any], k: int) -> None:
    """Refuse a K whose estimator is not the one the held-out threshold was taken with.

    log p(x) estimated from K draws is biased low by an amount that shrinks with K
    (Jensen's gap of the log of a mean), so a threshold from K' draws flags more (K < K')
    or fewer (K > K') items than `fpr`; the held-out ELBO is one draw's, so only K <= 1
    gives the same ELBO estimator (more draws narrow its spread)."""
    taken = int(quantiles["importance_samples"])
    if quantiles["statistic"] == "log_px":
        if k != taken:
            raise InvalidInput(
                f"the held-out threshold bounds log p(x) estimated with importance_samples "
                f"= {taken}; with {k} the estimate has another bias and the false-positive "
                f"rate would not be fpr: give importance_samples {taken} (or leave it out), "
                "or score without fpr")
    elif k > 1:
        raise InvalidInput(
            "the held-out threshold bounds the ELBO of one posterior draw (the model was "
            f"evaluated without importance samples); with importance_samples {k} the ELBO "
            "averages more draws and the false-positive rate would not be fpr: give 0 or 1 "
            "(or leave it out), or score without fpr")


def score_draws(limits: Settings, model: Model, n_items: int, importance_samples: int | None,
                fpr: float | None) -> int:
    """The K of a /score request, checked against its limits (413) and, with `fpr`, against
    the held-out threshold's estimator (409 without one, 422 for another K); default 0, or
    the threshold's own K."""
    if n_items > limits.score_max_rows:
        raise TooLarge(f"'x' has {n_items} items; /score takes at most "
                       f"{limits.score_max_rows} (LATENTBANK_SCORE_MAX_ROWS){BULK}")
    quantiles = (model.summary or {}).get("heldout_quantiles")
    if fpr is not None and quantiles is None:
        raise Conflict(f"model {model.id} was trained before held-out thresholds were stored "
                       "with models; train it again to score with 'fpr'")
    k = importance_samples
    if k is None:
        k = int(quantiles["importance_samples"]) if (
            fpr is not None and quantiles["statistic"] == "log_px") else 0
    if fpr is not None:
        _threshold_draws(quantiles, k)
    if n_items * max(1, k) > limits.score_max_draws:
        raise TooLarge(f"{n_items} items x {max(1, k)} draws is {n_items * max(1, k)} decoder "
                       f"rows; /score runs at most {limits.score_max_draws} "
                       f"(LATENTBANK_SCORE_MAX_DRAWS){BULK}")
    return k


def threshold_split(summary: dict[str, Any]) -> Literal["validation", "training"]:
    """The split a model's held-out figures came from: its validation rows, or its training
    rows when it was trained with val_fraction = 0."""
    return "training" if summary.get("heldout_split") == "train" else "validation"


def threshold_answer(model: Model, fpr: float, got: Scores) -> dict[str, Any]:
    """The held-out threshold at `fpr` and which items fall below it (is_outlier)."""
    quantiles = (model.summary or {})["heldout_quantiles"]
    statistic = quantiles["statistic"]
    value = threshold_at(quantiles, fpr)
    figures = got.log_px if statistic == "log_px" else got.elbo
    split = threshold_split(model.summary or {})
    return {"threshold": {
        "fpr": fpr, "value": value, "statistic": statistic,
        "importance_samples": quantiles["importance_samples"],
        "heldout_items": quantiles["n_items"], "split": split,
        "note": None if split == "validation" else TRAINING_SPLIT_NOTE},
        "is_outlier": (figures < value).tolist()}
