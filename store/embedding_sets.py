"""Embedding sets as rows (a set, its parts) and the one way a set's latents meet their
items, which every query of latents with item columns joins through."""

from __future__ import annotations

from sqlalchemy import select, text

from store.db import Database, get_row, narrowed
from store.errors import NotFound
from store.tables import EmbeddingSet

# a key's item in a set: through the part that holds the key's dataset (primary keys all
# the way: parts by set, items by (dataset, key), latents by (set, position)); psycopg's
# placeholder, for `binary_rows`
BY_KEY = ("embedding_set_parts p JOIN items i ON i.dataset_id = p.dataset_id "
          "JOIN latents l ON l.set_id = p.set_id AND l.item_index = p.start + i.index "
          "WHERE p.set_id = %(s)s")


def join_items(latents: str = "l") -> str:
    """The join from latent rows (aliased `latents`) to their items, aliased `i`."""
    return (f"JOIN items i ON i.dataset_id = {latents}.dataset_id "
            f"AND i.index = {latents}.dataset_index")


def get_set(db: Database, set_id: int) -> EmbeddingSet:
    return get_row(db, EmbeddingSet, set_id, "embedding set")


def list_sets(db: Database, *, model_id: int | None = None, status: str | None = None,
              limit: int = 100, offset: int = 0) -> list[EmbeddingSet]:
    """Embedding sets in id order, narrowed by each filter that is set."""
    query = narrowed(select(EmbeddingSet).order_by(EmbeddingSet.id).limit(limit)
                     .offset(offset), {EmbeddingSet.model_id: model_id,
                                       EmbeddingSet.status: status})
    with db.session() as s:
        return list(s.scalars(query))


def part_at(db: Database, set_id: int, position: int) -> tuple[int, int]:
    """(dataset id, start) of the set's part that holds `position`."""
    with db.engine.connect() as conn:
        row = conn.execute(text(
            "SELECT dataset_id, start FROM embedding_set_parts WHERE set_id = :s "
            "AND start <= :p AND :p < start + n_items"), {"s": set_id, "p": position}).first()
    if row is None:
        raise NotFound(f"embedding set {set_id} has no item at position {position}")
    return int(row[0]), int(row[1])
