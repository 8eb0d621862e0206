"""API keys (admin scope): create (the secret is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.auth import forget_key
from service.api.deps import Id, in_thread, require, services
from service.api.routes.datasets import ERRORS
from service.api.schemas import CreatedKeyOut, KeyOut, KeyRequest, WhoAmIOut
from store.errors import Conflict
from store.keys import SCOPES, create_key, list_keys, revoke_key

router = APIRouter(tags=["keys"])


@router.post("/v1/keys", status_code=201, response_model=CreatedKeyOut,
             dependencies=[require("admin")], responses=ERRORS,
             summary="Create an API key (the secret is shown once)")
async def new_key(request: Request, body: KeyRequest) -> CreatedKeyOut:
    svc = services(request)
    created = await in_thread(create_key, svc.db, body.name, list(body.scopes))
    return CreatedKeyOut(id=created.id, name=created.name, prefix=created.prefix,
                         scopes=created.scopes, key=created.key)


@router.get("/v1/whoami", response_model=WhoAmIOut, dependencies=[require("read")],
            responses=ERRORS, summary="The calling key and what it may do")
async def whoami(request: Request) -> WhoAmIOut:
    held = request.state.scopes
    return WhoAmIOut(key_id=request.state.key_id, scopes=[s for s in SCOPES if s in held])


@router.get("/v1/keys", response_model=list[KeyOut], dependencies=[require("admin")],
            responses=ERRORS)
async def keys(request: Request) -> list[KeyOut]:
    return [KeyOut.of(k) for k in await in_thread(list_keys, services(request).db)]


@router.delete("/v1/keys/{key_id}", response_model=KeyOut, dependencies=[require("admin")],
               responses=ERRORS, summary="Revoke a key")
async def revoke(request: Request, key_id: Id) -> KeyOut:
    svc = services(request)
    if key_id == getattr(request.state, "key_id", None):
        raise Conflict(f"key {key_id} is the one making this request; revoke it with "
                       "another admin key (so no one locks themselves out by mistake)")
    revoked = await in_thread(revoke_key, svc.db, key_id)
    # refused by this process from now on (its open event streams end at their next
    # poll); other API processes stop accepting it within their cache's 10 s
    forget_key(svc, revoked.key_hash)
    return KeyOut.of(revoked)
