"""Trained model versions (the `models` table)."""

from __future__ import annotations

from store.db import Database
from store.errors import NotFound
from store.tables import Model


def get_model(db: Database, model_id: int) -> Model:
    with db.session() as s:
        row = s.get(Model, model_id)
        if row is None:
            raise NotFound(f"model {model_id} does not exist")
        return row
