"""Job submission: validate, then write the model/set row and the job row in one
transaction. Publishing the task is the caller's next step (after the commit), so a
broker outage loses nothing: an unpublished job is published by the workers' maintenance.

`models.config` is plain dataclasses (no torch), so the API can validate here.
"""

from __future__ import annotations

import itertools
import math
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models.config import ConfigError, TrainConfig, VAEConfig
from store.datasets import get_dataset
from store.db import Database
from store.errors import Conflict, IdempotencyMismatch, InvalidInput, NotFound
from store.jobs import find_by_key
from store.tables import EmbeddingSet, Job, Model

MAX_SWEEP = 64


def validate_training(dataset_item_shape: list[int], model: dict[str, Any],
                      training: dict[str, Any]) -> tuple[VAEConfig, TrainConfig]:
    if not isinstance(model, dict) or not isinstance(training, dict):
        raise InvalidInput("'model' and 'training' must be objects")
    spec = {"input_shape": list(dataset_item_shape), **model}
    try:
        model_cfg, train_cfg = VAEConfig.from_dict(spec), TrainConfig.from_dict(training)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from None
    item = tuple(dataset_item_shape)
    if model_cfg.input_shape != item and not (
            model_cfg.family == "mlp" and math.prod(item) == model_cfg.input_size):
        raise InvalidInput(f"model.input_shape {list(model_cfg.input_shape)} does not fit the "
                           f"dataset's items {list(item)}")
    return model_cfg, train_cfg


def _existing(db: Database, key: str | None, request_hash: str | None) -> Job | None:
    """The job a repeated Idempotency-Key created, if the request is the same one."""
    job = find_by_key(db, key) if key is not None else None
    if job is not None and request_hash and job.request_hash != request_hash:
        name = key.rsplit("#", 1)[0] if job.sweep_id else key
        raise IdempotencyMismatch(
            f"Idempotency-Key {name!r} was already used with a different request; "
            "use a new key for a new request")
    return job


def submit_training(db: Database, dataset_id: int, model: dict[str, Any],
                    training: dict[str, Any], *, idempotency_key: str | None = None,
                    sweep_id: str | None = None, max_attempts: int = 3,
                    request_hash: str | None = None) -> tuple[Job, bool]:
    """A model row (pending) and its training job (queued), in one transaction. Returns
    (job, created). A known `idempotency_key` answers its first job (created False) if
    `request_hash` matches the first request's, and IdempotencyMismatch otherwise."""
    existing = _existing(db, idempotency_key, request_hash)
    if existing is not None:
        return existing, False
    dataset = get_dataset(db, dataset_id)
    model_cfg, train_cfg = validate_training(dataset.item_shape, model, training)
    config = {"model": model_cfg.to_dict(), "training": train_cfg.to_dict()}
    try:
        with db.session() as s:
            row = Model(dataset_id=dataset_id, config=config, status="pending",
                        sweep_id=sweep_id)
            s.add(row)
            s.flush()
            job = Job(kind="train", params={"dataset_id": dataset_id, **config},
                      model_id=row.id, sweep_id=sweep_id, idempotency_key=idempotency_key,
                      request_hash=request_hash, max_attempts=max_attempts, status="queued")
            s.add(job)
            s.flush()
            return job, True
    except IntegrityError:  # the same key raced in from another request
        existing = _existing(db, idempotency_key, request_hash)
        if existing is None:
            raise
        return existing, False


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """{"model.latent_dim": [2, 8], "model.beta": [1, 4]} -> 4 override dicts."""
    if not isinstance(grid, dict) or not grid:
        raise InvalidInput("sweep must be a non-empty object of 'model.x' / 'training.x' lists")
    for name, values in grid.items():
        section, _, field = name.partition(".")
        if section not in ("model", "training") or not field:
            raise InvalidInput(f"sweep key {name!r} must look like 'model.<field>' or "
                               "'training.<field>'")
        if not isinstance(values, list) or not values:
            raise InvalidInput(f"sweep values for {name!r} must be a non-empty list")
    combos = [dict(zip(grid, values, strict=True))
              for values in itertools.product(*grid.values())]
    if len(combos) > MAX_SWEEP:
        raise InvalidInput(f"sweep has {len(combos)} configurations; the limit is {MAX_SWEEP}")
    return combos


def submit_sweep(db: Database, dataset_id: int, model: dict[str, Any],
                 training: dict[str, Any], grid: dict[str, list[Any]], *,
                 idempotency_key: str | None = None, max_attempts: int = 3,
                 request_hash: str | None = None) -> tuple[str, list[Job]]:
    """One training job per grid point, grouped under a sweep id. All are validated first."""
    dataset = get_dataset(db, dataset_id)
    plans = []
    for overrides in expand_grid(grid):
        m, t = dict(model), dict(training)
        for name, value in overrides.items():
            section, _, field = name.partition(".")
            (m if section == "model" else t)[field] = value
        validate_training(dataset.item_shape, m, t)
        plans.append((m, t))
    sweep_id = idempotency_key and f"sweep-{uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key)}"
    sweep_id = sweep_id or f"sweep-{uuid.uuid4()}"
    jobs = []
    for i, (m, t) in enumerate(plans):
        key = f"{idempotency_key}#{i}" if idempotency_key else None
        jobs.append(submit_training(db, dataset_id, m, t, idempotency_key=key,
                                    sweep_id=sweep_id, max_attempts=max_attempts,
                                    request_hash=request_hash)[0])
    return sweep_id, jobs


def leaderboard(db: Database, sweep_id: str) -> list[dict[str, Any]]:
    """The sweep's models, best held-out log p(x) first (unfinished ones last)."""
    with db.session() as s:
        models = list(s.scalars(select(Model).where(Model.sweep_id == sweep_id)))
    if not models:
        raise NotFound(f"sweep {sweep_id!r} does not exist")

    def score(m: Model) -> float:
        value = (m.summary or {}).get("heldout_log_px")
        return -math.inf if value is None else float(value)

    ranked = sorted(models, key=lambda m: (-score(m), m.id))
    return [{"rank": i + 1, "model_id": m.id, "status": m.status,
             "latent_dim": m.config["model"]["latent_dim"], "beta": m.config["model"]["beta"],
             "heldout_log_px": (m.summary or {}).get("heldout_log_px"),
             "heldout_elbo": (m.summary or {}).get("heldout_elbo"),
             "config": m.config} for i, m in enumerate(ranked)]


def submit_embedding(db: Database, model_id: int, dataset_id: int, importance_samples: int = 0,
                     *, idempotency_key: str | None = None, max_attempts: int = 3,
                     request_hash: str | None = None) -> tuple[Job, bool]:
    """An embedding set (pending) and its job (queued) for a ready model over a dataset,
    in one transaction; idempotency as in `submit_training`."""
    existing = _existing(db, idempotency_key, request_hash)
    if existing is not None:
        return existing, False
    if isinstance(importance_samples, bool) or not isinstance(importance_samples, int) or not (
            0 <= importance_samples <= 100_000):
        raise InvalidInput("importance_samples must be an integer in [0, 100000]")
    dataset = get_dataset(db, dataset_id)
    with db.session() as s:
        model = s.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist")
        if model.status != "ready":
            raise Conflict(f"model {model_id} is {model.status}, not ready")
    validate_training(dataset.item_shape, {k: v for k, v in model.config["model"].items()
                                           if k != "input_shape"} | {
        "input_shape": model.config["model"]["input_shape"]}, model.config["training"])
    try:
        with db.session() as s:
            es = EmbeddingSet(model_id=model_id, dataset_id=dataset_id,
                              dim=model.config["model"]["latent_dim"], n_items=dataset.n_items,
                              importance_samples=importance_samples, status="pending")
            s.add(es)
            s.flush()
            job = Job(kind="embed", params={"model_id": model_id, "dataset_id": dataset_id,
                                            "importance_samples": importance_samples},
                      model_id=model_id, embedding_set_id=es.id,
                      idempotency_key=idempotency_key, request_hash=request_hash,
                      max_attempts=max_attempts, status="queued")
            s.add(job)
            s.flush()
            return job, True
    except IntegrityError:  # the same key raced in from another request
        existing = _existing(db, idempotency_key, request_hash)
        if existing is None:
            raise
        return existing, False
