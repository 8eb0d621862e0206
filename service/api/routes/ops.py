"""Health and readiness (open to all), and Prometheus metrics (`metrics_access`: open on
loopback by default, a read key otherwise; the Authenticate middleware decides)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.broker import broker_ping
from service.api.deps import SvcDep, in_thread
from service.api.schemas.common import ErrorBody, Health
from store.db import check_alive

router = APIRouter(tags=["operations"])
READY_TIMEOUT = 2.0  # seconds each readiness probe may take; they run side by side


@router.get("/healthz", response_model=Health, summary="The process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}},
            summary="The database and the broker answer (each within 2 s); `degraded` "
                    "(200) while the primary is down and a read replica answers searches")
async def readyz(svc: SvcDep) -> JSONResponse:
    # async: both probes run side by side, each bounded by its own timeout
    limit = READY_TIMEOUT

    async def probe(fn: Any) -> str:
        try:
            await asyncio.wait_for(in_thread(fn), limit)
            return "ok"
        except TimeoutError:
            return f"unavailable (no answer within {limit:g} s)"
        except Exception as exc:
            return f"unavailable ({type(exc).__name__})"

    results = await asyncio.gather(probe(lambda: check_alive(svc.db)),
                                   probe(lambda: broker_ping(svc.settings.broker_url, limit)))
    checks = dict(zip(("database", "broker"), results, strict=True))
    ok = all(v == "ok" for v in checks.values())
    status = "ok" if ok else "unavailable"
    if svc.reads.replicas:  # as the lag check last saw them (store/replicas.py)
        states = svc.reads.status()
        answering = sum(s["up"] for s in states)
        checks["replicas"] = f"{answering} of {len(states)} answering, " + ", ".join(
            f"{s['replica']}: " + _replica_state(s)
            for s in states)
        if not ok and answering and checks["database"] != "ok":
            status = "degraded"  # the primary is down: searches and exports still answer
    code = 200 if status != "unavailable" else 503
    return JSONResponse(Health(status=status, checks=checks).model_dump(), status_code=code)


def _replica_state(state: dict[str, Any]) -> str:
    if not state["up"]:
        return f"not used ({state['error']})" if state["error"] else "not checked yet"
    if state["lag_s"] is None:
        return "lag not measured (the primary is down)"
    if state["lag_s"] == float("inf"):
        return "behind every primary position sampled so far"
    return f"lag {state['lag_s']:.1f} s" + ("" if state["used"] else " (too far behind)")


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}},
                       **{code: {"model": ErrorBody} for code in (401, 403, 429)}},
            summary="Prometheus metrics: request latency, jobs by status, decode batch sizes",
            # the key is optional (an empty requirement): loopback clients need none
            openapi_extra={"security": [{}, {"HTTPBearer": []}]},
            description="Open to clients on the loopback address; others need a read key "
                        "(the `metrics_access` setting: `loopback`, `key` or `open`).")
def metrics(svc: SvcDep) -> Response:  # the Authenticate layer checks access
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
