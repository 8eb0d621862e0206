"""/v1/aliases: names (`prod`, `staging`) for models and embedding sets.

`PUT /v1/aliases/{name}` creates the alias or moves it, atomically; every route that
takes a model or set id also takes `@name` (service.api.deps.ModelId / SetId).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Request, Response

from service.api.deps import in_thread, require, services
from service.api.routes.datasets import ERRORS
from service.api.schemas import AliasOut, AliasRequest
from store import aliases as store_aliases
from store.errors import InvalidInput
from store.tables import ALIAS_PATTERN

router = APIRouter(prefix="/v1/aliases", tags=["aliases"])
Name = Annotated[str, Path(pattern=ALIAS_PATTERN, description="lower-case letters, digits, "
                                                              "'_', '.', '-'; a letter first")]


def _out(view: store_aliases.AliasView) -> AliasOut:
    return AliasOut.model_validate(dataclasses.asdict(view))


@router.put("/{name}", response_model=AliasOut, dependencies=[require("write")],
            responses={201: {"model": AliasOut, "description": "created"}, **ERRORS},
            summary="Create the alias, or move it to another model or set (atomically)")
async def put_alias(request: Request, response: Response, name: Name,
                    body: AliasRequest) -> AliasOut:
    if (body.model_id is None) == (body.embedding_set_id is None):
        raise InvalidInput("give exactly one of 'model_id' and 'embedding_set_id'")
    kind: store_aliases.Kind = "model" if body.model_id is not None else "embedding_set"
    target = body.model_id if body.model_id is not None else body.embedding_set_id
    view, action = await in_thread(store_aliases.set_alias, services(request).db, name, kind,
                                   target, getattr(request.state, "key_id", None))
    response.status_code = 201 if action == "created" else 200
    return _out(view)


@router.get("", response_model=list[AliasOut], dependencies=[require("read")],
            responses=ERRORS, summary="Every alias with its history")
async def aliases(request: Request,
                  kind: Literal["model", "embedding_set"] | None = Query(None),
                  ) -> list[AliasOut]:
    views = await in_thread(store_aliases.list_aliases, services(request).db, kind)
    return [_out(v) for v in views]


@router.get("/{name}", response_model=AliasOut, dependencies=[require("read")],
            responses=ERRORS)
async def alias(request: Request, name: Name) -> AliasOut:
    return _out(await in_thread(store_aliases.get_alias, services(request).db, name))


@router.delete("/{name}", status_code=204, dependencies=[require("write")],
               responses=ERRORS, response_class=Response)
async def remove_alias(request: Request, name: Name) -> Response:
    await in_thread(store_aliases.delete_alias, services(request).db, name,
                    getattr(request.state, "key_id", None))
    return Response(status_code=204)
