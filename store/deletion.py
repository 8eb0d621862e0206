"""What refuses a delete (an alias naming the row, a queued or running job using it), and
deleting an embedding set under that policy."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, or_, select
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import Conflict, NotFound
from store.indexes import live_index_builds
from store.partitions import drop_partitions
from store.tables import Alias, EmbeddingSet, Job


def blockers(s: Session, *, model_ids: Sequence[int] = (), set_ids: Sequence[int] = (),
             ) -> tuple[list[str], list[int]]:
    """The aliases naming any of the models or sets, and the queued or running jobs that
    use them: what refuses a delete."""
    aliases = list(s.scalars(select(Alias.name).where(or_(
        Alias.model_id.in_(list(model_ids)), Alias.embedding_set_id.in_(list(set_ids))))
        .order_by(Alias.name)))
    jobs = list(s.scalars(select(Job.id).where(
        Job.status.in_(("queued", "running")),
        or_(Job.model_id.in_(list(model_ids)), Job.embedding_set_id.in_(list(set_ids))))
        .order_by(Job.id)))
    return aliases, jobs


def refuse_if_blocked(what: str, aliases: list[str], jobs: list[int]) -> None:
    if aliases:
        names = ", ".join(f"'{a}'" for a in aliases[:5])
        raise Conflict(f"{what} is named by alias {names}: move or delete the alias first "
                       "(PUT or DELETE /v1/aliases/{name})")
    if jobs:
        raise Conflict(f"{what} is used by queued or running job "
                       f"{', '.join(map(str, jobs[:5]))}: cancel it or wait for it to end")


def delete_set(db: Database, set_id: int) -> None:
    """Delete an embedding set: its row, then its partition (the rows and the index, in
    one DROP: no DELETE, no dead tuples; store.partitions). Refused (Conflict) while an
    alias names it, a queued or running job uses it, or a worker builds its index (a
    live lease: an index owed but not being built does not hold the set)."""
    with db.session() as s:
        es = s.get(EmbeddingSet, set_id, with_for_update=True)
        if es is None:
            raise NotFound(f"embedding set {set_id} does not exist")
        refuse_if_blocked(f"embedding set {set_id}", *blockers(s, set_ids=[set_id]))
        if live_index_builds(s, [set_id]):
            raise Conflict(f"embedding set {set_id}'s index is being built; delete it once "
                           "the set's index_status is no longer 'building'")
        s.execute(delete(EmbeddingSet).where(EmbeddingSet.id == set_id))
    drop_partitions(db, [set_id])  # the rows and the index, at once
