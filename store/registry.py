"""The model registry: trained model versions (the `models` table) and their per-epoch metrics."""

from __future__ import annotations

from sqlalchemy import delete, select

from store.artifacts import ArtifactStore
from store.db import Database, get_row, narrowed, unbounded
from store.deletion import blockers, refuse_if_blocked
from store.errors import Conflict, NotFound
from store.indexes import live_index_builds
from store.partitions import drop_partitions
from store.tables import EmbeddingSet, Model, TrainingMetric


def get_model(db: Database, model_id: int) -> Model:
    return get_row(db, Model, model_id, "model")


def list_models(db: Database, *, status: str | None = None, dataset_id: int | None = None,
                sweep_id: str | None = None, limit: int = 100, offset: int = 0) -> list[Model]:
    """Models in id order, narrowed by each filter that is set."""
    query = narrowed(select(Model).order_by(Model.id).limit(limit).offset(offset),
                     {Model.status: status, Model.dataset_id: dataset_id,
                      Model.sweep_id: sweep_id})
    with db.session() as s:
        return list(s.scalars(query))


def model_metrics(db: Database, model_id: int) -> list[TrainingMetric]:
    """The model's metric rows by epoch and split (NotFound for an unknown model)."""
    with db.session() as s:
        if s.get(Model, model_id) is None:
            raise NotFound(f"model {model_id} does not exist")
        return list(s.scalars(select(TrainingMetric).where(TrainingMetric.model_id == model_id)
                              .order_by(TrainingMetric.epoch, TrainingMetric.split)))


def delete_model(db: Database, artifacts: ArtifactStore, model_id: int) -> list[int]:
    """Delete a model with its metrics, embedding sets (rows and indexes) and files
    (checkpoints, ONNX). Refused (Conflict) while an alias names the model or one of its
    sets, or a queued or running job uses them. Returns the ids of the deleted sets."""
    with db.session() as s:
        model = s.get(Model, model_id, with_for_update=True)
        if model is None:
            raise NotFound(f"model {model_id} does not exist")
        sets = list(s.scalars(select(EmbeddingSet).where(EmbeddingSet.model_id == model_id)
                              .with_for_update()))
        set_ids = [es.id for es in sets]
        refuse_if_blocked(f"model {model_id}",
                          *blockers(s, model_ids=[model_id], set_ids=set_ids))
        building = live_index_builds(s, set_ids)
        if building:
            raise Conflict(f"model {model_id}'s embedding set {building[0]} is building its "
                           "index; delete the model once it is built")
        unbounded(s)  # the cascade is as large as the metrics
        s.execute(delete(Model).where(Model.id == model_id))  # metrics and sets cascade
    drop_partitions(db, set_ids)  # the sets' rows and indexes
    artifacts.delete(f"models/{int(model_id)}")
    return set_ids
