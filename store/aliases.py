"""Aliases (`prod`, `staging`, ...) naming one ready model or embedding set, each created
or moved in one transaction that locks the alias and its new target, every change kept."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import Conflict, InvalidInput, NotFound
from store.tables import ALIAS_PATTERN, Alias, AliasEvent, EmbeddingSet, Model

Kind = Literal["model", "embedding_set"]
KINDS: dict[str, tuple[type[Model] | type[EmbeddingSet], str]] = {
    "model": (Model, "model"), "embedding_set": (EmbeddingSet, "embedding set")}
REF = re.compile(r"^@([a-z][a-z0-9_.-]{0,62})$")


@dataclass
class AliasView:
    name: str
    kind: Kind
    target_id: int
    created_at: object
    updated_at: object
    history: list[dict[str, object]]


def check_name(name: str) -> str:
    if not re.fullmatch(ALIAS_PATTERN, name):
        raise InvalidInput(f"alias {name[:80]!r} is not a valid name: lower-case letters, "
                           "digits, '_', '.', '-', starting with a letter, at most 63")
    return name


def _kind_of(row: Alias) -> Kind:
    return "model" if row.model_id is not None else "embedding_set"


def _target_of(row: Alias) -> int:
    return int(row.model_id if row.model_id is not None else row.embedding_set_id)  # type: ignore[arg-type]


def set_alias(db: Database, name: str, kind: Kind, target_id: int,
              key_id: int | None = None) -> tuple[AliasView, str]:
    """Create the alias or move it to `target_id`, atomically. Returns the alias and what
    happened: `created`, `moved` or `unchanged`."""
    check_name(name)
    if kind not in KINDS:
        raise InvalidInput(f"kind must be 'model' or 'embedding_set'; got {kind!r}")
    table, what = KINDS[kind]
    column = "model_id" if kind == "model" else "embedding_set_id"
    with db.session() as s:
        target = s.get(table, target_id, with_for_update={"read": True})
        if target is None:
            raise NotFound(f"{what} {target_id} does not exist")
        if target.status != "ready":
            raise Conflict(f"{what} {target_id} is {target.status}, not ready: an alias "
                           "names a ready one")
        inserted = s.scalar(insert(Alias).values(name=name, **{column: target_id})
                            .on_conflict_do_nothing(index_elements=["name"])
                            .returning(Alias.name))
        row = s.scalars(select(Alias).where(Alias.name == name).with_for_update()
                        .execution_options(populate_existing=True)).one()
        previous = _target_of(row)
        if _kind_of(row) != kind:
            raise Conflict(f"alias '{name}' names {KINDS[_kind_of(row)][1]} {previous}; "
                           f"delete it before naming {what} {target_id} with it")
        if inserted is not None:
            action = "created"
        elif previous == target_id:
            action = "unchanged"
        else:
            action = "moved"
            setattr(row, column, target_id)
            row.updated_at = func.now()
        if action != "unchanged":
            s.add(AliasEvent(name=name, action=action, kind=kind, target_id=target_id,
                             previous_id=None if action == "created" else previous,
                             key_id=key_id))
        s.flush()
        s.refresh(row)
        return _view(s, row), action


def _view(s: Session, row: Alias) -> AliasView:
    events = s.scalars(select(AliasEvent).where(AliasEvent.name == row.name)
                       .order_by(AliasEvent.id)).all()
    return AliasView(row.name, _kind_of(row), _target_of(row), row.created_at,
                     row.updated_at, [_event(e) for e in events])


def _event(e: AliasEvent) -> dict[str, object]:
    return {"action": e.action, "kind": e.kind, "target_id": e.target_id,
            "previous_id": e.previous_id, "key_id": e.key_id, "at": e.at}


def get_alias(db: Database, name: str) -> AliasView:
    with db.session() as s:
        row = s.get(Alias, name)
        if row is None:
            raise NotFound(f"alias '{name[:80]}' does not exist")
        return _view(s, row)


def list_aliases(db: Database, kind: Kind | None = None) -> list[AliasView]:
    with db.session() as s:
        query = select(Alias).order_by(Alias.name)
        if kind is not None:
            column = Alias.model_id if kind == "model" else Alias.embedding_set_id
            query = query.where(column.is_not(None))
        return [_view(s, row) for row in s.scalars(query)]


def delete_alias(db: Database, name: str, key_id: int | None = None) -> None:
    with db.session() as s:
        row = s.get(Alias, name, with_for_update=True)
        if row is None:
            raise NotFound(f"alias '{name[:80]}' does not exist")
        s.add(AliasEvent(name=name, action="deleted", kind=_kind_of(row), target_id=None,
                         previous_id=_target_of(row), key_id=key_id))
        s.delete(row)


def resolve(db: Database, ref: str | int, kind: Kind) -> int:
    """The id a client gave: a number, or `@name` for an alias of that kind."""
    if isinstance(ref, int):
        return ref
    if ref.isdigit():
        return int(ref)
    found = REF.fullmatch(ref)
    if found is None:
        raise InvalidInput(f"{ref[:80]!r} is neither an id nor an alias ('@name')")
    name = found[1]
    with db.session() as s:
        row = s.get(Alias, name)
        if row is None:
            raise NotFound(f"alias '{name}' does not exist")
        if _kind_of(row) != kind:
            wanted = "a model" if kind == "model" else "an embedding set"
            raise NotFound(f"alias '{name}' names {KINDS[_kind_of(row)][1]} "
                           f"{_target_of(row)}, not {wanted}")
        return _target_of(row)
