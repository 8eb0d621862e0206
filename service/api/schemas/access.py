"""Access: API keys, the calling key, and aliases."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.schemas.common import MAX_ID
from store.tables import ApiKey


class WhoAmIOut(BaseModel):
    key_id: int
    scopes: list[Literal["read", "write", "admin"]] = Field(
        description="what this key may do (a higher scope includes the lower ones)")


class AliasRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model_id": 3}, {"embedding_set_id": 7}]})

    model_id: int | None = Field(None, ge=1, le=MAX_ID)
    embedding_set_id: int | None = Field(None, ge=1, le=MAX_ID)


class AliasEventOut(BaseModel):
    action: Literal["created", "moved", "deleted"]
    kind: Literal["model", "embedding_set"]
    target_id: int | None = Field(description="where the alias points after the change")
    previous_id: int | None = Field(description="where it pointed before")
    key_id: int | None = Field(description="the API key that made the change")
    at: dt.datetime


class AliasOut(BaseModel):
    name: str
    kind: Literal["model", "embedding_set"]
    target_id: int
    created_at: dt.datetime
    updated_at: dt.datetime
    history: list[AliasEventOut] = Field(description="every change, oldest first (including "
                                                     "those before a delete of the name)")


class KeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "ci-pipeline", "scopes": ["read", "write"]}]})

    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["read", "write", "admin"]] = Field(min_length=1)


class KeyOut(BaseModel):
    id: int
    name: str
    prefix: str
    scopes: list[str]
    created_at: dt.datetime | None = None
    last_used_at: dt.datetime | None = None
    revoked_at: dt.datetime | None = None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        return cls(id=k.id, name=k.name, prefix=k.prefix, scopes=list(k.scopes),
                   created_at=k.created_at, last_used_at=k.last_used_at,
                   revoked_at=k.revoked_at)


class CreatedKeyOut(KeyOut):
    key: str = Field(description="the secret; shown only in this answer")
