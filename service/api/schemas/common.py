"""What every resource shares: the error body, health, ids and alias references."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

Metric = Literal["l2", "cosine"]
MAX_ID = 2**63 - 1  # PostgreSQL bigint
# an id, or "@name" for an alias (store.aliases), wherever a body names a model or set
Ref = Annotated[int, Field(ge=1, le=MAX_ID)] | Annotated[
    str, Field(pattern=r"^@[a-z][a-z0-9_.-]{0,62}$", description="@name: an alias")]


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_input"])
    message: str = Field(examples=["model.latent_dim: Input should be greater than 0"])


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
