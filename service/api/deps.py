"""What every route needs, as FastAPI dependencies: the process's services, the caller's
API key with its scope, and model and set references resolved (an id or an @alias)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.api.errors import ApiError
from service.api.inference import Inference
from service.api.metrics import Metrics
from service.api.ttl_cache import TTLCache
from store.artifacts import ArtifactStore
from store.db import Database
from store.publishing import TaskSender
from store.replicas import Reads
from store.settings import Settings


@dataclass
class Services:
    settings: Settings
    db: Database
    artifacts: ArtifactStore
    sender: TaskSender  # publishes job tasks (store.publishing.publish)
    inference: Inference
    metrics: Metrics
    # which server answers a read that may run a little behind (store/replicas.py)
    reads: Reads
    # verified keys: (id, scopes) by the secret's hash. A key revoked by another process
    # stops working within `seconds`; one revoked through this API at once.
    keys: TTLCache = field(default_factory=lambda: TTLCache(10.0))
    # keys verified in the last 10 minutes (by hash): the failed-authentication limit of
    # their address does not stop their next lookup (service/api/auth.py)
    good_keys: TTLCache = field(default_factory=lambda: TTLCache(600.0))
    # unknown or revoked keys (by hash): refused again without a lookup
    unknown_keys: TTLCache = field(default_factory=lambda: TTLCache(60.0))
    # key lookups in flight (by hash): a request for a key already being looked up waits
    # for that lookup instead of starting its own (service/api/auth.py)
    lookups: dict[str, asyncio.Task] = field(default_factory=dict)
    # ready models (a ready model's files never change): skip a query per decode
    ready_models: TTLCache = field(default_factory=lambda: TTLCache(30.0))


async def services(request: Request) -> Services:
    """The process's services (async: a sync route need not hop to a thread for them)."""
    return request.app.state.services


SvcDep = Annotated[Services, Depends(services)]


bearer = HTTPBearer(auto_error=False, description="an API key from `latentbank keys create`")


def require(scope: str) -> Any:
    """A dependency: the caller's key, which must hold `scope` (401 / 403 otherwise).

    The key was verified before the body was read, by the Authenticate middleware
    (service/api/auth.py), which also checks this scope there; this reads what it found
    (no second lookup), and declares the bearer scheme for OpenAPI."""

    async def check(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None,
                                           Depends(bearer)]) -> int:
        state = request.scope.get("state") or {}
        key_id = state.get("key_id")
        if key_id is None:  # no verified key: never served without one
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        if scope not in state["scopes"]:
            raise ApiError(403, f"this API key lacks the '{scope}' scope")
        return key_id

    check.__name__ = f"require_{scope}"
    check.required_scope = scope  # type: ignore[attr-defined]  # read by auth.scope_table
    return Depends(check)


# The caller's key id, once it holds the scope (see `require`)
ReadKey = Annotated[int, require("read")]
WriteKey = Annotated[int, require("write")]
AdminKey = Annotated[int, require("admin")]


async def in_thread(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await run_in_threadpool(fn, *args, **kwargs)


Id = Annotated[int, Path(ge=1, le=2**63 - 1, description="a row id")]


REF_PATTERN = r"^([1-9][0-9]{0,18}|@[a-z][a-z0-9_.-]{0,62})$"
REF_HELP = "an id, or @name for an alias (PUT /v1/aliases/{name})"


async def _ref(request: Request, ref: str, kind: str) -> int:
    from store.aliases import resolve

    if ref.isdigit():
        if int(ref) > 2**63 - 1:
            raise ApiError(404, f"{'model' if kind == 'model' else 'embedding set'} {ref} "
                                "does not exist")
        return int(ref)
    # an alias is read on the primary (a move is seen at once), on a replica while the
    # primary is down (store/replicas.py)
    reads = request.app.state.services.reads
    return (await in_thread(reads.fresh, resolve, resolve, ref, kind))[0]


async def _model_id(request: Request, model_id: Annotated[str, Path(
        pattern=REF_PATTERN, description=REF_HELP, examples=["1", "@prod"])]) -> int:
    return await _ref(request, model_id, "model")


async def _set_id(request: Request, set_id: Annotated[str, Path(
        pattern=REF_PATTERN, description=REF_HELP, examples=["1", "@prod"])]) -> int:
    return await _ref(request, set_id, "embedding_set")


ModelId = Annotated[int, Depends(_model_id)]  # a model by id or @alias, resolved
SetId = Annotated[int, Depends(_set_id)]  # an embedding set by id or @alias, resolved
