"""API keys (admin scope): create (the secret is shown once), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.auth import forget_key
from service.api.deps import AdminKey, Id, ReadKey, SvcDep
from service.api.error_responses import ERRORS
from service.api.schemas.access import CreatedKeyOut, KeyOut, KeyRequest, WhoAmIOut
from store.errors import Conflict
from store.keys import SCOPES, create_key, list_keys, revoke_key

router = APIRouter(tags=["keys"], responses=ERRORS)


@router.post("/v1/keys", status_code=201, response_model=CreatedKeyOut,
             summary="Create an API key (the secret is shown once)")
def new_key(_: AdminKey, svc: SvcDep, body: KeyRequest) -> CreatedKeyOut:
    created = create_key(svc.db, body.name, list(body.scopes))
    return CreatedKeyOut(id=created.id, name=created.name, prefix=created.prefix,
                         scopes=created.scopes, key=created.key)


@router.get("/v1/whoami", response_model=WhoAmIOut, summary="The calling key and what it may do")
async def whoami(_: ReadKey, request: Request) -> WhoAmIOut:
    held = request.state.scopes
    return WhoAmIOut(key_id=request.state.key_id, scopes=[s for s in SCOPES if s in held])


@router.get("/v1/keys", response_model=list[KeyOut])
def keys(_: AdminKey, svc: SvcDep) -> list[KeyOut]:
    return [KeyOut.of(k) for k in list_keys(svc.db)]


@router.delete("/v1/keys/{key_id}", response_model=KeyOut, summary="Revoke a key")
def revoke(caller: AdminKey, svc: SvcDep, key_id: Id) -> KeyOut:
    if key_id == caller:
        raise Conflict(f"key {key_id} is the one making this request; revoke it with "
                       "another admin key (so no one locks themselves out by mistake)")
    revoked = revoke_key(svc.db, key_id)
    # refused by this process from now on (its open event streams end at their next
    # poll); other API processes stop accepting it within their cache's 10 s
    forget_key(svc, revoked.key_hash)
    return KeyOut.of(revoked)
