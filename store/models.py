"""Trained model versions (the `models` table) and their per-epoch metrics."""

from __future__ import annotations

from sqlalchemy import select

from store.db import Database, get_row, narrowed
from store.errors import NotFound
from store.tables import Model, TrainingMetric


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
