"""/v1/models: metadata, metrics, ONNX downloads and training curves (serving is in
routes/serving.py)."""

from __future__ import annotations

import io
from typing import Any, Literal

from fastapi import APIRouter, Query, Response

from service.api.deps import ModelId, ReadKey, SvcDep, WriteKey, in_thread
from service.api.error_responses import ERRORS
from service.api.schemas.models import MetricRow, ModelOut
from service.api.serving_policy import ready_model
from store import registry
from store.errors import Conflict
from store.tables import MODEL_STATUSES, TrainingMetric

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)
PNG = "image/png"


def metric_dict(m: TrainingMetric) -> dict[str, Any]:
    return MetricRow.model_validate(m, from_attributes=True).model_dump()


# named `models` and `model` as before the rename: the names set the OpenAPI operation ids
@router.get("", response_model=list[ModelOut], name="models")
def list_models(_: ReadKey, svc: SvcDep, status: Literal[MODEL_STATUSES] | None = None,
                dataset_id: int | None = Query(None, ge=1, le=2**63 - 1),
                sweep_id: str | None = Query(None, max_length=200),
                limit: int = Query(100, ge=1, le=1000),
                offset: int = Query(0, ge=0, le=2**62)) -> list[ModelOut]:
    rows = registry.list_models(svc.db, status=status, dataset_id=dataset_id,
                                    sweep_id=sweep_id, limit=limit, offset=offset)
    return [ModelOut.of(m) for m in rows]


@router.get("/{model_id}", response_model=ModelOut, name="model")
def get_model(_: ReadKey, svc: SvcDep, model_id: ModelId) -> ModelOut:
    return ModelOut.of(registry.get_model(svc.db, model_id))


@router.delete("/{model_id}", status_code=204, response_class=Response,
               summary="Delete a model: its metrics, embedding sets (rows and indexes), "
                       "checkpoints and ONNX files; 409 while aliased or used by a job")
async def remove_model(_: WriteKey, svc: SvcDep, model_id: ModelId) -> Response:
    await in_thread(registry.delete_model, svc.db, svc.artifacts, model_id)
    # on the event loop: the inference sessions and their batchers are the loop's own
    svc.ready_models.pop(model_id)
    svc.inference.forget(model_id)
    return Response(status_code=204)


@router.get("/{model_id}/metrics", response_model=list[MetricRow],
            summary="Per-epoch metrics in nats per item (train and val splits)")
def model_metrics(_: ReadKey, svc: SvcDep, model_id: ModelId) -> list[MetricRow]:
    rows = registry.model_metrics(svc.db, model_id)
    return [MetricRow.model_validate(m, from_attributes=True) for m in rows]


@router.get("/{model_id}/onnx/{role}", responses={
    200: {"content": {"application/octet-stream": {}}, "description": "the verified .onnx"}},
    response_class=Response, summary="Download the encoder or decoder")
async def onnx_file(_: ReadKey, svc: SvcDep, model_id: ModelId,
                    role: Literal["encoder", "decoder"]) -> Response:
    # async: the ready model comes from the process's cache without a thread
    model = await ready_model(svc, model_id)
    sha = model.encoder_sha256 if role == "encoder" else model.decoder_sha256
    uri = model.encoder_uri if role == "encoder" else model.decoder_uri

    def read() -> bytes:
        path = svc.inference.sessions.local_file(model_id, role, sha, uri)
        with open(path, "rb") as f:
            return f.read()

    return Response(await in_thread(read), media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="model-{model_id}-{role}.onnx"',
        "ETag": f'"{sha}"'})


@router.get("/{model_id}/plots/curves.png", responses={200: {"content": {PNG: {}}}},
            response_class=Response,
            summary="Training curves: ELBO, log p(x), reconstruction and KL per epoch")
def curves_png(_: ReadKey, svc: SvcDep, model_id: ModelId) -> Response:
    rows = registry.model_metrics(svc.db, model_id)
    if not rows:
        raise Conflict(f"model {model_id} has no metrics yet")
    from service.api.plots import plot_training_curves  # matplotlib: only when it draws

    buffer = io.BytesIO()
    plot_training_curves([metric_dict(m) for m in rows], buffer)
    return Response(buffer.getvalue(), media_type=PNG)
