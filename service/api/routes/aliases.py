"""/v1/aliases: names (`prod`, `staging`) for models and embedding sets.

`PUT /v1/aliases/{name}` creates the alias or moves it, atomically; every route that
takes a model or set id also takes `@name` (service.api.deps.ModelId / SetId).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response

from service.api.deps import ReadKey, SvcDep, WriteKey
from service.api.error_responses import ERRORS
from service.api.schemas.access import AliasOut, AliasRequest
from store import aliases as store_aliases
from store.errors import InvalidInput
from store.tables import ALIAS_PATTERN

router = APIRouter(prefix="/v1/aliases", tags=["aliases"], responses=ERRORS)
Name = Annotated[str, Path(pattern=ALIAS_PATTERN, description="lower-case letters, digits, "
                                                              "'_', '.', '-'; a letter first")]


def _out(view: store_aliases.AliasView) -> AliasOut:
    return AliasOut.model_validate(dataclasses.asdict(view))


@router.put("/{name}", response_model=AliasOut,
            responses={201: {"model": AliasOut, "description": "created"}},
            summary="Create the alias, or move it to another model or set (atomically)")
def put_alias(key_id: WriteKey, svc: SvcDep, response: Response, name: Name,
              body: AliasRequest) -> AliasOut:
    if (body.model_id is None) == (body.embedding_set_id is None):
        raise InvalidInput("give exactly one of 'model_id' and 'embedding_set_id'")
    kind: store_aliases.Kind = "model" if body.model_id is not None else "embedding_set"
    target = body.model_id if body.model_id is not None else body.embedding_set_id
    view, action = store_aliases.set_alias(svc.db, name, kind, target, key_id)
    response.status_code = 201 if action == "created" else 200
    return _out(view)


@router.get("", response_model=list[AliasOut], summary="Every alias with its history")
def aliases(_: ReadKey, svc: SvcDep,
            kind: Literal["model", "embedding_set"] | None = Query(None)) -> list[AliasOut]:
    return [_out(v) for v in store_aliases.list_aliases(svc.db, kind)]


@router.get("/{name}", response_model=AliasOut)
def alias(_: ReadKey, svc: SvcDep, name: Name) -> AliasOut:
    return _out(store_aliases.get_alias(svc.db, name))


@router.delete("/{name}", status_code=204, response_class=Response)
def remove_alias(key_id: WriteKey, svc: SvcDep, name: Name) -> Response:
    store_aliases.delete_alias(svc.db, name, key_id)
    return Response(status_code=204)
