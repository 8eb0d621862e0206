"""Job submission: the model (or embedding set) row and its job row, in one transaction,
bound to its request by an Idempotency-Key (docs/internals/workers.md)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.datasets import get_dataset
from store.db import Database
from store.errors import Conflict, IdempotencyMismatch, InvalidInput, NotFound
from store.jobs import find_by_key
from store.partitions import create_partition
from store.tables import VECTOR_TYPES, Dataset, EmbeddingSet, EmbeddingSetPart, Item, Job, Model

MAX_IMPORTANCE_SAMPLES = 100_000


def _lock_dataset(s: Session, dataset_id: int) -> None:
    """Inside a submission: share-lock the dataset row (FOR KEY SHARE) until the commit.

    `delete_dataset` locks the row FOR UPDATE before it checks what uses the dataset, so
    the two serialise: a delete that went first leaves no row (NotFound, 404, never a
    foreign-key error), and a delete that comes later waits for this commit and then
    sees the new model or set and its job (Conflict, 409)."""
    if s.get(Dataset, dataset_id, with_for_update={"read": True, "key_share": True},
             populate_existing=True) is None:
        raise NotFound(f"dataset {dataset_id} does not exist")


def _existing(db: Database, key: str | None, request_hash: str | None) -> Job | None:
    """The job a repeated Idempotency-Key created, if the request is the same one."""
    job = find_by_key(db, key) if key is not None else None
    if job is not None and request_hash and job.request_hash != request_hash:
        name = key.rsplit("#", 1)[0] if job.sweep_id else key
        raise IdempotencyMismatch(
            f"Idempotency-Key {name!r} was already used with a different request; "
            "use a new key for a new request")
    return job


def _submit(db: Database, idempotency_key: str | None, request_hash: str | None,
            write: Callable[[Session], Job]) -> tuple[Job, bool]:
    """Run `write` (it adds the rows of one submission) in one transaction, unless the
    Idempotency-Key already made its job. Returns (job, created)."""
    existing = _existing(db, idempotency_key, request_hash)
    if existing is not None:
        return existing, False
    try:
        with db.session() as s:
            job = write(s)
            job.idempotency_key, job.request_hash = idempotency_key, request_hash
            s.flush()
            return job, True
    except IntegrityError:  # the same key raced in from another request
        existing = _existing(db, idempotency_key, request_hash)
        if existing is None:
            raise
        return existing, False


def submit_training(db: Database, dataset_id: int, config: dict[str, Any], *,
                    idempotency_key: str | None = None, sweep_id: str | None = None,
                    max_attempts: int = 3, request_hash: str | None = None,
                    ) -> tuple[Job, bool]:
    """A model row (pending) and its training job (queued), in one transaction.

    `config` is {"model": ..., "training": ...}, validated by the caller. Returns
    (job, created); a known `idempotency_key` answers its first job (created False)."""
    get_dataset(db, dataset_id)  # NotFound before anything is written

    def write(s: Session) -> Job:
        _lock_dataset(s, dataset_id)
        row = Model(dataset_id=dataset_id, config=config, status="pending", sweep_id=sweep_id)
        s.add(row)
        s.flush()
        job = Job(kind="train", params={"dataset_id": dataset_id, **config}, model_id=row.id,
                  sweep_id=sweep_id, max_attempts=max_attempts, status="queued")
        s.add(job)
        return job

    return _submit(db, idempotency_key, request_hash, write)


def submit_ingest(db: Database, name: str, params: dict[str, Any], *,
                  idempotency_key: str | None = None, request_hash: str | None = None,
                  max_attempts: int = 3) -> tuple[Job, bool]:
    """An ingest job (queued) that registers the dataset `name` from a source the caller
    checked: `params` holds its `uri` (as given) or `upload` (a file saved for the job),
    and its reading `options`. Idempotency as in `submit_training`."""

    def write(s: Session) -> Job:
        job = Job(kind="ingest", params={"name": name, **params}, max_attempts=max_attempts,
                  status="queued")
        s.add(job)
        return job

    return _submit(db, idempotency_key, request_hash, write)


def submit_sweep(db: Database, dataset_id: int, configs: list[dict[str, Any]], *,
                 idempotency_key: str | None = None, max_attempts: int = 3,
                 request_hash: str | None = None) -> tuple[str, list[Job]]:
    """One training job per configuration (validated by the caller), under one sweep id.
    With an Idempotency-Key, job i takes the key `<key>#i`, so a repeated sweep answers
    its first jobs."""
    sweep_id = idempotency_key and f"sweep-{uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key)}"
    sweep_id = sweep_id or f"sweep-{uuid.uuid4()}"
    jobs = []
    for i, config in enumerate(configs):
        key = f"{idempotency_key}#{i}" if idempotency_key else None
        jobs.append(submit_training(db, dataset_id, config, idempotency_key=key,
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


def fits(item_shape: list[int], model_config: dict[str, Any]) -> bool:
    """Whether a dataset's items can go through a model: the model's input shape, or, for
    an MLP, any shape with as many values."""
    want = list(model_config["input_shape"])
    return list(item_shape) == want or (model_config.get("family") == "mlp"
                                        and math.prod(item_shape) == math.prod(want))


def _embeddable(db: Database, model_id: int, dataset_id: int,
                importance_samples: int | None) -> tuple[Dataset, Model]:
    """The dataset and the model of an embedding submission, checked: a valid K, a ready
    model, and items that fit it."""
    if importance_samples is not None and (
            isinstance(importance_samples, bool) or not isinstance(importance_samples, int)
            or not 0 <= importance_samples <= MAX_IMPORTANCE_SAMPLES):
        raise InvalidInput(f"importance_samples must be an integer in "
                           f"[0, {MAX_IMPORTANCE_SAMPLES}]")
    dataset = get_dataset(db, dataset_id)
    with db.session() as s:
        model = s.get(Model, model_id)
        if model is None:
            raise NotFound(f"model {model_id} does not exist")
        if model.status != "ready":
            raise Conflict(f"model {model_id} is {model.status}, not ready")
    if not fits(dataset.item_shape, model.config["model"]):
        raise InvalidInput(f"dataset {dataset_id}'s items {list(dataset.item_shape)} do not fit "
                           f"model {model_id}'s input shape "
                           f"{list(model.config['model']['input_shape'])}")
    return dataset, model


def submit_embedding(db: Database, model_id: int, dataset_id: int,
                     importance_samples: int | None = 0, *, embedding_set_id: int | None = None,
                     idempotency_key: str | None = None, max_attempts: int = 3,
                     request_hash: str | None = None,
                     vector_type: str | None = None) -> tuple[Job, bool]:
    """An embedding set (pending) and its job (queued) for a ready model over a dataset
    whose items fit it, in one transaction; idempotency as in `submit_training`.

    With `embedding_set_id` the dataset's items are appended to that ready set of the same
    model instead (`append_part` checks it); `importance_samples` None means the set's K
    (a new set: 0), `vector_type` None the set's (a new set: 'vector'; 'halfvec' stores
    its latents as float16, store/vectors.py)."""
    if vector_type is not None and vector_type not in VECTOR_TYPES:
        raise InvalidInput(f"vector_type {vector_type[:40]!r} is not one of "
                           f"{', '.join(VECTOR_TYPES)}")
    existing = _existing(db, idempotency_key, request_hash)
    if existing is not None:
        return existing, False
    dataset, model = _embeddable(db, model_id, dataset_id, importance_samples)

    def write(s: Session) -> Job:
        _lock_dataset(s, dataset_id)  # a concurrent delete of the dataset waits, or went first
        # the model row locked for the transaction: a concurrent delete waits, or went first
        locked = s.get(Model, model_id, with_for_update={"read": True},
                       populate_existing=True)
        if locked is None:
            raise NotFound(f"model {model_id} does not exist")
        params = {"model_id": model_id, "dataset_id": dataset_id}
        if embedding_set_id is not None:
            part = append_part(s, embedding_set_id, model_id, dataset_id, dataset.n_items,
                               importance_samples, vector_type)
            job = Job(kind="embed", model_id=model_id, embedding_set_id=embedding_set_id,
                      params={**params, "importance_samples": part.pop("importance_samples"),
                              "append": part},
                      max_attempts=max_attempts, status="queued")
            s.add(job)
            s.flush()
            s.execute(update(EmbeddingSetPart).where(
                EmbeddingSetPart.set_id == embedding_set_id,
                EmbeddingSetPart.dataset_id == dataset_id).values(job_id=job.id))
            return job
        k = importance_samples or 0
        es = EmbeddingSet(model_id=model_id, dataset_id=dataset_id,
                          dim=model.config["model"]["latent_dim"], n_items=dataset.n_items,
                          importance_samples=k, status="pending",
                          vector_type=vector_type or "vector")
        s.add(es)
        s.flush()
        create_partition(s, es.id, es.vector_type)
        s.add(EmbeddingSetPart(set_id=es.id, dataset_id=dataset_id, start=0,
                               n_items=dataset.n_items, status="ready"))
        job = Job(kind="embed", params={**params, "importance_samples": k},
                  model_id=model_id, embedding_set_id=es.id, max_attempts=max_attempts,
                  status="queued")
        s.add(job)
        return job

    return _submit(db, idempotency_key, request_hash, write)


CLASHES_SHOWN = 5


def append_part(s: Session, set_id: int, model_id: int, dataset_id: int, n_items: int,
                importance_samples: int | None, vector_type: str | None = None,
                ) -> dict[str, Any]:
    """Inside a submission: check that the dataset can be appended to the set and add its
    part (`writing`, at the set's end). The set row is locked, so appends to one set
    serialise and the key check sees every part. Returns the job's `append` parameters."""
    es = s.get(EmbeddingSet, set_id, with_for_update=True)
    if es is None:
        raise NotFound(f"embedding set {set_id} does not exist")
    if es.model_id != model_id:
        raise InvalidInput(f"embedding set {set_id} was made by model {es.model_id}, not by "
                           f"model {model_id}: an append uses the set's own model")
    if es.status != "ready":
        raise Conflict(f"embedding set {set_id} is {es.status}, not ready")
    if importance_samples is not None and importance_samples != es.importance_samples:
        raise InvalidInput(f"embedding set {set_id} holds log p(x) from "
                           f"{es.importance_samples} importance samples; an append uses the "
                           f"same (give {es.importance_samples} or leave it out)")
    if vector_type is not None and vector_type != es.vector_type:
        raise InvalidInput(f"embedding set {set_id} stores {es.vector_type} latents; an "
                           f"append uses the same (give {es.vector_type!r} or leave it out)")
    parts = list(s.scalars(select(EmbeddingSetPart).where(EmbeddingSetPart.set_id == set_id)))
    busy = [p for p in parts if p.status == "writing"]
    if busy:
        raise Conflict(f"embedding set {set_id} is taking an append already (job "
                       f"{busy[0].job_id}); append once it has ended")
    if any(p.dataset_id == dataset_id for p in parts):
        raise Conflict(f"dataset {dataset_id} is in embedding set {set_id} already")
    clashes = list(s.scalars(
        select(Item.key).where(Item.dataset_id == dataset_id, Item.key.in_(
            select(Item.key).where(Item.dataset_id.in_([p.dataset_id for p in parts]))))
        .order_by(Item.index).limit(CLASHES_SHOWN + 1)))
    if clashes:
        named = ", ".join(repr(k) for k in clashes[:CLASHES_SHOWN])
        more = " and more" if len(clashes) > CLASHES_SHOWN else ""
        raise Conflict(f"keys must be unique in embedding set {set_id}: dataset {dataset_id} "
                       f"has keys it holds already: {named}{more}")
    start = max(p.start + p.n_items for p in parts)
    s.add(EmbeddingSetPart(set_id=set_id, dataset_id=dataset_id, start=start, n_items=n_items,
                           status="writing"))
    return {"start": start, "n_items": n_items, "importance_samples": es.importance_samples}
