"""/v1/models: metadata, metrics, ONNX downloads, plots, and onnxruntime serving."""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response

from models.config import VAEConfig
from models.transforms import bits_per_dim
from service.api.deps import (
    NPY,
    ModelId,
    Services,
    dumps_arrays,
    in_thread,
    load_npy,
    media_type,
    npy_bytes,
    parse_json,
    read_body,
    require,
    services,
    wants,
)
from service.api.errors import ApiError
from service.api.images import (
    SCORE_FIELDS,
    image_body,
    image_input,
    is_image_request,
    read_upload,
    score_params,
)
from service.api.inference import (
    as_float_rows,
    as_vector,
    check_answer,
    check_rows,
    decoder_mean,
    is_image_shape,
    item_values,
    model_view,
    slerp,
)
from service.api.routes.datasets import ERRORS
from service.api.schemas import (
    ArrayOut,
    DecodeRequest,
    EncodeOut,
    EncodeRequest,
    InterpolateRequest,
    MetricRow,
    ModelOut,
    SampleOut,
    SampleRequest,
    ScoreOut,
    TraverseOut,
    TraverseRequest,
)
from service.api.scoring import Scores, logits_source, threshold_at
from service.api.scoring import score as score_items
from store import models as store_models
from store.aliases import resolve
from store.errors import Conflict, InvalidInput, TooLarge
from store.retrieval import get_item
from store.tables import MODEL_STATUSES, Model, TrainingMetric

router = APIRouter(prefix="/v1/models", tags=["models"])
PNG = "image/png"
OCTETS = "application/octet-stream"


def get_model(svc: Services, model_id: int) -> Model:
    return store_models.get_model(svc.db, model_id)


def _ready(svc: Services, model_id: int) -> Model:
    model = get_model(svc, model_id)
    if model.status != "ready":
        raise Conflict(f"model {model_id} is {model.status}, not ready")
    svc.ready_models.put(model_id, model)
    return model


async def ready_model(svc: Services, model_id: int) -> Model:
    cached = svc.ready_models.get(model_id)
    return cached if cached is not None else await in_thread(_ready, svc, model_id)


def metric_dict(m: TrainingMetric) -> dict[str, Any]:
    return MetricRow.model_validate(m, from_attributes=True).model_dump()


@router.get("", response_model=list[ModelOut], dependencies=[require("read")],
            responses=ERRORS)
async def models(request: Request, status: Literal[MODEL_STATUSES] | None = None,
                 dataset_id: int | None = Query(None, ge=1, le=2**63 - 1),
                 sweep_id: str | None = Query(None, max_length=200),
                 limit: int = Query(100, ge=1, le=1000),
                 offset: int = Query(0, ge=0, le=2**62)) -> list[ModelOut]:
    rows = await in_thread(store_models.list_models, services(request).db, status=status,
                           dataset_id=dataset_id, sweep_id=sweep_id, limit=limit, offset=offset)
    return [ModelOut.of(m) for m in rows]


@router.get("/{model_id}", response_model=ModelOut, dependencies=[require("read")],
            responses=ERRORS)
async def model(request: Request, model_id: ModelId) -> ModelOut:
    return ModelOut.of(await in_thread(get_model, services(request), model_id))


@router.delete("/{model_id}", status_code=204, dependencies=[require("write")],
               responses=ERRORS, response_class=Response,
               summary="Delete a model: its metrics, embedding sets (rows and indexes), "
                       "checkpoints and ONNX files; 409 while aliased or used by a job")
async def remove_model(request: Request, model_id: ModelId) -> Response:
    svc = services(request)
    await in_thread(store_models.delete_model, svc.db, svc.artifacts, model_id)
    svc.ready_models.pop(model_id)
    svc.inference.forget(model_id)
    return Response(status_code=204)


@router.get("/{model_id}/metrics", response_model=list[MetricRow],
            dependencies=[require("read")], responses=ERRORS,
            summary="Per-epoch metrics in nats per item (train and val splits)")
async def model_metrics(request: Request, model_id: ModelId) -> list[MetricRow]:
    rows = await in_thread(store_models.model_metrics, services(request).db, model_id)
    return [MetricRow.model_validate(m, from_attributes=True) for m in rows]


@router.get("/{model_id}/onnx/{role}", dependencies=[require("read")], responses={
    200: {"content": {"application/octet-stream": {}}, "description": "the verified .onnx"},
    **ERRORS}, response_class=Response, summary="Download the encoder or decoder")
async def onnx_file(request: Request, model_id: ModelId,
                    role: Literal["encoder", "decoder"]) -> Response:
    svc = services(request)
    model = await ready_model(svc, model_id)
    sha = model.encoder_sha256 if role == "encoder" else model.decoder_sha256
    uri = model.encoder_uri if role == "encoder" else model.decoder_uri
    path = await in_thread(svc.inference.sessions.local_file, model_id, role, sha, uri)

    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return Response(await in_thread(read), media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="model-{model_id}-{role}.onnx"',
        "ETag": f'"{sha}"'})


@router.get("/{model_id}/plots/curves.png", dependencies=[require("read")],
            responses={200: {"content": {PNG: {}}}, **ERRORS}, response_class=Response,
            summary="Training curves: ELBO, log p(x), reconstruction and KL per epoch")
async def curves_png(request: Request, model_id: ModelId) -> Response:
    from service.api.plots import plot_training_curves

    rows = await in_thread(store_models.model_metrics, services(request).db, model_id)
    if not rows:
        raise Conflict(f"model {model_id} has no metrics yet")

    def render() -> bytes:
        buffer = io.BytesIO()
        plot_training_curves([metric_dict(m) for m in rows], buffer)
        return buffer.getvalue()

    return Response(await in_thread(render), media_type=PNG)


# -- serving ---------------------------------------------------------------------------

def _array_body(request: Request) -> str:
    """The body's media type: JSON or .npy, which may also come as
    application/octet-stream (415 for anything else, before other checks)."""
    kind = media_type(request)
    if kind == OCTETS:
        return NPY
    if kind not in (NPY, "application/json"):
        raise ApiError(415, f"content type {kind!r} is not accepted: send application/json "
                            f"or an .npy file as {NPY} (or {OCTETS})")
    return kind


def _body_array(raw: bytes, request: Request, field: str, model_cls: Any) -> Any:
    """The request's array: an .npy body, or the JSON body's `field`."""
    if _array_body(request) == NPY:
        return load_npy(raw, field)
    return getattr(parse_json(raw, model_cls), field)


# Answers larger than this many numbers are encoded (JSON, .npy, PNG) in a worker thread:
# up to max_response_values of them take a few hundred milliseconds, which the event loop
# (and every other request, /healthz included) would otherwise wait out.
_INLINE_VALUES = 1 << 16
_INLINE_BYTES = 1 << 16  # the same for request bodies


async def _rows(raw: bytes, request: Request, field: str, model_cls: Any, width: int | None,
                max_rows: int, item_shape: list[int] | None = None) -> np.ndarray:
    """The body's rows, checked (as_float_rows); a large body (up to max_request_bytes of
    JSON to parse and check) is read in a worker thread, off the event loop."""
    def read() -> np.ndarray:
        return as_float_rows(_body_array(raw, request, field, model_cls), width, field,
                             max_rows, item_shape=item_shape)

    return read() if len(raw) <= _INLINE_BYTES else await in_thread(read)


def _answer(request: Request, arrays: dict[str, np.ndarray], image: str | None = None,
            ) -> Response:
    """JSON, .npy (the `image` array, else the first) or a PNG grid of `image`."""
    main = arrays[image] if image else next(iter(arrays.values()))
    kind = wants(request, NPY, PNG)
    if kind == NPY:
        return Response(npy_bytes(main), media_type=NPY)
    if kind == PNG:
        if image is None or not is_image_shape(main.shape[1:]):
            raise ApiError(406, f"items of shape {list(main.shape[1:])} are not images; "
                                "ask for application/json or application/x-npy")
        from service.api.plots import image_grid

        buffer = io.BytesIO()
        image_grid(main, columns=min(len(main), 16)).save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type=PNG)
    return Response(dumps_arrays(arrays), media_type="application/json")


async def _reply(request: Request, arrays: dict[str, np.ndarray], image: str | None = None,
                 ) -> Response:
    if sum(a.size for a in arrays.values()) <= _INLINE_VALUES:
        return _answer(request, arrays, image)
    return await in_thread(_answer, request, arrays, image)


SERVE_ERRORS = {**ERRORS, 406: ERRORS[409], 503: ERRORS[409]}


def _serving_body(schema: str, image: dict[str, Any] | None = None) -> dict[str, Any]:
    # The .npy body is declared as application/octet-stream, a type every client generator
    # can send; the server takes the same bytes as application/x-npy too. Routes that take
    # an image (one item, as the model's dataset's were made) declare it beside them.
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}},
        OCTETS: {"schema": {"type": "string", "format": "binary",
                            "description": f"an .npy file (also accepted as {NPY})"}},
        **(image_body(image, ", ".join(image) or "no parameters")
           if image is not None else {})}}}


def _answers(model: type) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model, "content": {NPY: {}, PNG: {}}}, **SERVE_ERRORS}


async def _decode(svc: Services, model: Model, z: np.ndarray) -> np.ndarray:
    out = await svc.inference.run(model.id, "decoder", model.decoder_sha256 or "",
                                    model.decoder_uri or "", z)
    return decoder_mean(out)


@router.post("/{model_id}/decode", dependencies=[require("read")],
             openapi_extra=_serving_body("DecodeRequest"), responses=_answers(ArrayOut),
             response_class=Response, summary="Decode latent vectors to the decoder's mean")
async def decode(request: Request, model_id: ModelId) -> Response:
    svc = services(request)
    _array_body(request)
    raw = await read_body(request)
    model = await ready_model(svc, model_id)
    z = await _rows(raw, request, "z", DecodeRequest, model.config["model"]["latent_dim"],
                    svc.settings.decode_max_rows)
    check_answer(len(z), item_values(model.config["model"]), svc.settings.max_response_values,
                 "decode")
    return await _reply(request, {"x": await _decode(svc, model, z)}, image="x")


@router.post("/{model_id}/sample", dependencies=[require("read")], responses=_answers(SampleOut),
             response_class=Response,
             summary="Decode draws from the prior N(0, temperature² I)")
async def sample(request: Request, model_id: ModelId, body: SampleRequest) -> Response:
    svc = services(request)
    model = await ready_model(svc, model_id)
    check_rows(body.n, svc.settings.decode_max_rows, "n")
    dim = model.config["model"]["latent_dim"]
    check_answer(body.n, item_values(model.config["model"]) + dim,
                 svc.settings.max_response_values, "sample")
    rng = np.random.default_rng(body.seed)
    z = (body.temperature * rng.standard_normal((body.n, dim))).astype(np.float32)
    return await _reply(request, {"x": await _decode(svc, model, z), "z": z}, image="x")


def _endpoints(svc: Services, model: Model, body: InterpolateRequest,
               ) -> tuple[np.ndarray, np.ndarray]:
    by_vector = body.z_from is not None or body.z_to is not None
    by_key = body.from_key is not None or body.to_key is not None
    if by_vector == by_key or (by_vector and (body.z_from is None or body.z_to is None)) or (
            by_key and (body.from_key is None or body.to_key is None
                        or body.embedding_id is None)):
        raise InvalidInput("give either 'z_from' and 'z_to', or 'embedding_id' with "
                           "'from_key' and 'to_key'")
    dim = model.config["model"]["latent_dim"]
    if by_key:
        from store.embedding_sets import get_set

        es = get_set(svc.db, resolve(svc.db, body.embedding_id, "embedding_set"))  # type: ignore[arg-type]
        if es.model_id != model.id:
            raise InvalidInput(f"embedding set {es.id} was made by model {es.model_id}, "
                               f"not by model {model.id}")
        a = get_item(svc.db, es.id, body.from_key)["mu"]  # type: ignore[arg-type]
        b = get_item(svc.db, es.id, body.to_key)["mu"]  # type: ignore[arg-type]
        return a, b
    ends = [as_vector(v, dim, name).astype(np.float32)
            for v, name in ((body.z_from, "z_from"), (body.z_to, "z_to"))]
    return ends[0], ends[1]


@router.post("/{model_id}/interpolate", dependencies=[require("read")],
             responses=_answers(SampleOut), response_class=Response,
             summary="Decode a path between two latent vectors or two stored items")
async def interpolate(request: Request, model_id: ModelId, body: InterpolateRequest) -> Response:
    svc = services(request)
    model = await ready_model(svc, model_id)
    check_rows(body.steps, svc.settings.decode_max_rows, "steps")
    check_answer(body.steps, item_values(model.config["model"]) + model.config["model"][
        "latent_dim"], svc.settings.max_response_values, "interpolate")
    a, b = await in_thread(_endpoints, svc, model, body)
    t = np.linspace(0.0, 1.0, body.steps)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    z = slerp(a64, b64, t) if body.method == "slerp" else (1 - t)[:, None] * a64 + t[:, None] * b64
    z = z.astype(np.float32)
    return await _reply(request, {"x": await _decode(svc, model, z), "z": z}, image="x")


def _traversal(svc: Services, model: Model, body: TraverseRequest,
               ) -> tuple[np.ndarray, list[int], list[float | None], np.ndarray]:
    """The traversal's latent grid (dims x steps rows), its dimensions, their KL, offsets;
    refused before anything is built or read when its rows (repeated dimensions count) or
    its answer's values pass their limits."""
    dim = model.config["model"]["latent_dim"]
    if body.z is not None and (body.embedding_id is not None or body.key is not None):
        raise InvalidInput("give the base as 'z', or as 'embedding_id' with 'key', not both")
    if (body.embedding_id is None) != (body.key is None):
        raise InvalidInput("'embedding_id' and 'key' go together")
    kl = (model.summary or {}).get("kl_per_dim")
    if body.dims is not None:
        bad = [d for d in body.dims if not 0 <= d < dim]
        if bad:
            raise InvalidInput(f"'dims' must lie in [0, {dim}); got {bad[:5]}")
        dims = list(body.dims)
    else:
        order = np.argsort(-np.asarray(kl), kind="stable") if kl else np.arange(dim)
        dims = [int(d) for d in order[:body.top]]
    rows, limits = len(dims) * body.steps, svc.settings
    if rows > limits.decode_max_rows:
        raise InvalidInput(f"the traversal is {len(dims)} dims x {body.steps} steps = {rows} "
                           "rows (a repeated dimension counts each time); the limit is "
                           f"{limits.decode_max_rows} (LATENTBANK_DECODE_MAX_ROWS)")
    check_answer(rows, item_values(model.config["model"]) + dim, limits.max_response_values,
                 "traverse")
    if body.key is not None:
        from store.embedding_sets import get_set

        es = get_set(svc.db, resolve(svc.db, body.embedding_id, "embedding_set"))  # type: ignore[arg-type]
        if es.model_id != model.id:
            raise InvalidInput(f"embedding set {es.id} was made by model {es.model_id}, "
                               f"not by model {model.id}")
        base = get_item(svc.db, es.id, body.key)["mu"].astype(np.float64)
    elif body.z is not None:
        base = as_vector(body.z, dim, "z")
    else:
        base = np.zeros(dim)
    offsets = np.linspace(-body.span, body.span, body.steps)
    z = np.repeat(base[None], rows, axis=0)
    for row, d in enumerate(dims):
        z[row * body.steps:(row + 1) * body.steps, d] += offsets
    return z.astype(np.float32), dims, [kl[d] if kl else None for d in dims], offsets


@router.post("/{model_id}/traverse", dependencies=[require("read")],
             responses=_answers(TraverseOut), response_class=Response,
             summary="Move one latent dimension at a time from a base point; a PNG grid has "
                     "one row per dimension (most held-out KL first), one column per step")
async def traverse(request: Request, model_id: ModelId, body: TraverseRequest) -> Response:
    svc = services(request)
    model = await ready_model(svc, model_id)
    z, dims, kl, offsets = await in_thread(_traversal, svc, model, body)
    if wants(request, NPY, PNG) == PNG:
        from service.api.plots import image_grid

        x = await _decode(svc, model, z)
        if not is_image_shape(x.shape[1:]):
            raise ApiError(406, f"items of shape {list(x.shape[1:])} are not images; ask "
                                "for application/json or application/x-npy")

        def draw() -> bytes:
            buffer = io.BytesIO()
            image_grid(x, columns=body.steps).save(buffer, format="PNG")
            return buffer.getvalue()

        return Response(await in_thread(draw), media_type=PNG)
    return await _reply(request, {"x": await _decode(svc, model, z), "z": z,
                                  "dims": np.asarray(dims), "offsets": offsets,
                                  "kl": np.asarray(kl, dtype=np.float64) if kl[0] is not None
                                  else np.full(len(dims), np.nan)}, image="x")


async def _encoded(request: Request, model_id: int, answer: Literal["encode", "reconstruct"],
                   ) -> tuple[Services, Model, dict[str, np.ndarray]]:
    """The request's items (JSON or .npy, item-shaped) through the model's encoder, once
    the answer (mu and logvar, or the reconstructions) is known to be within its bound."""
    svc = services(request)
    if is_image_request(request):  # one image, transformed as the model's dataset was
        model = await ready_model(svc, model_id)
        x = await image_input(svc, await read_upload(request, ()), model.dataset_id,
                              model.config["model"])
    else:
        _array_body(request)
        raw = await read_body(request)
        model = await ready_model(svc, model_id)
        x = await _rows(raw, request, "x", EncodeRequest, None, svc.settings.decode_max_rows,
                        item_shape=model.config["model"]["input_shape"])
    config = model.config["model"]
    check_answer(len(x), 2 * config["latent_dim"] if answer == "encode" else item_values(config),
                 svc.settings.max_response_values, answer)
    x = (model_view(x, config) if x.size <= _INLINE_VALUES
         else await in_thread(model_view, x, config))
    out = await svc.inference.run(model.id, "encoder", model.encoder_sha256 or "",
                                    model.encoder_uri or "", x)
    return svc, model, out


@router.post("/{model_id}/encode", dependencies=[require("read")],
             openapi_extra=_serving_body("EncodeRequest", {}), responses=_answers(EncodeOut),
             response_class=Response, summary="Posterior means and log-variances of items")
async def encode(request: Request, model_id: ModelId) -> Response:
    _, _, out = await _encoded(request, model_id, "encode")
    return await _reply(request, {"mu": out["mu"], "logvar": out["logvar"]})


@router.post("/{model_id}/reconstruct", dependencies=[require("read")],
             openapi_extra=_serving_body("EncodeRequest"), responses=_answers(ArrayOut),
             response_class=Response,
             summary="Decode each item's posterior mean: the decoder's mean at mu(x)")
async def reconstruct(request: Request, model_id: ModelId) -> Response:
    svc, model, out = await _encoded(request, model_id, "reconstruct")
    return await _reply(request, {"x": await _decode(svc, model, out["mu"])}, image="x")


# -- scoring new items ---------------------------------------------------------------

SCORE_FORM = {"importance_samples": {"type": "integer", "minimum": 0, "maximum": 5000},
              "fpr": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
              "seed": {"type": "integer", "minimum": 0}}
MAX_IMPORTANCE_SAMPLES = 5000
TRAINING_SPLIT_NOTE = ("the model was trained with val_fraction = 0, so its threshold comes "
                       "from the items it was trained on: new items score lower than those "
                       "and are flagged more often than fpr")


def _score_rows(svc: Services, model: Model, x: np.ndarray, mu: np.ndarray,
                logvar: np.ndarray, importance_samples: int, seed: int | None,
                ) -> tuple[Scores, str | None]:
    """The items' scores, and where their (continuous) Bernoulli logits came from
    (service.api.scoring.logits_source: older files have no `logits` output)."""
    loaded = svc.inference.sessions.get(model.id, "decoder", model.decoder_sha256,
                                        model.decoder_uri)
    config = VAEConfig.from_dict(model.config["model"])

    def decode(z: np.ndarray) -> dict[str, np.ndarray]:
        outputs = loaded.session.run(loaded.output_names, {loaded.input_name: z})
        return dict(zip(loaded.output_names, outputs, strict=True))

    scores = score_items(decode, x, mu, logvar, config, importance_samples,
                         np.random.default_rng(seed))
    return scores, logits_source(loaded.output_names, config.likelihood)


def _threshold_draws(quantiles: dict[str, Any], k: int) -> None:
    """Refuse a K whose estimator is not the one the held-out threshold was taken with.

    log p(x) estimated from K draws is biased low by an amount that shrinks with K
    (Jensen's gap of the log of a mean), so a threshold from K' draws flags more (K < K')
    or fewer (K > K') items than `fpr`; the held-out ELBO is one draw's, so only K <= 1
    gives the same ELBO estimator (more draws narrow its spread)."""
    taken = int(quantiles["importance_samples"])
    if quantiles["statistic"] == "log_px":
        if k != taken:
            raise InvalidInput(
                f"the held-out threshold bounds log p(x) estimated with importance_samples "
                f"= {taken}; with {k} the estimate has another bias and the false-positive "
                f"rate would not be fpr: give importance_samples {taken} (or leave it out), "
                "or score without fpr")
    elif k > 1:
        raise InvalidInput(
            "the held-out threshold bounds the ELBO of one posterior draw (the model was "
            f"evaluated without importance samples); with importance_samples {k} the ELBO "
            "averages more draws and the false-positive rate would not be fpr: give 0 or 1 "
            "(or leave it out), or score without fpr")


def threshold_split(summary: dict[str, Any]) -> Literal["validation", "training"]:
    """The split a model's held-out figures came from: its validation rows, or its training
    rows when it was trained with val_fraction = 0."""
    return "training" if summary.get("heldout_split") == "train" else "validation"


@router.post("/{model_id}/score", dependencies=[require("read")],
             openapi_extra=_serving_body("EncodeRequest", SCORE_FORM),
             responses={200: {"model": ScoreOut}, **SERVE_ERRORS, 413: ERRORS[409]},
             response_class=Response,
             summary="ELBO, reconstruction, KL and log p(x) (with its Monte-Carlo error) of "
                     "new items; with fpr, a held-out threshold and is_outlier")
async def score(request: Request, model_id: ModelId,
                importance_samples: int | None = Query(
                    None, ge=0, le=MAX_IMPORTANCE_SAMPLES,
                    description="K draws for log p(x); default 0, or with fpr the K the "
                                "held-out threshold was taken with (with fpr, another K is "
                                "a 422: its estimator has another bias)"),
                fpr: float | None = Query(
                    None, gt=0, le=0.5, description="false-positive rate on the held-out "
                                                    "split: adds threshold and is_outlier"),
                seed: int | None = Query(None, ge=0, le=2**63 - 1,
                                         description="seed of the posterior draws")) -> Response:
    svc = services(request)
    if is_image_request(request):  # one image, transformed as the model's dataset was
        model = await ready_model(svc, model_id)
        upload = await read_upload(request, SCORE_FIELDS)
        params = score_params(upload.fields)
        importance_samples, fpr, seed = params.importance_samples, params.fpr, params.seed
        x = await image_input(svc, upload, model.dataset_id, model.config["model"])
    else:
        _array_body(request)
        raw = await read_body(request)
        model = await ready_model(svc, model_id)
        x = as_float_rows(_body_array(raw, request, "x", EncodeRequest), None, "x", 2**62,
                          item_shape=model.config["model"]["input_shape"])
    limits = svc.settings
    bulk = "; score more with an embedding job (POST /v1/embedding-jobs), which stores the " \
           "same figures for every item of a dataset"
    if len(x) > limits.score_max_rows:
        raise TooLarge(f"'x' has {len(x)} items; /score takes at most "
                       f"{limits.score_max_rows} (LATENTBANK_SCORE_MAX_ROWS){bulk}")
    quantiles = (model.summary or {}).get("heldout_quantiles")
    if fpr is not None and quantiles is None:
        raise Conflict(f"model {model.id} was trained before held-out thresholds were stored "
                       "with models; train it again to score with 'fpr'")
    k = importance_samples
    if k is None:
        k = int(quantiles["importance_samples"]) if (
            fpr is not None and quantiles["statistic"] == "log_px") else 0
    if fpr is not None:
        _threshold_draws(quantiles, k)
    if len(x) * max(1, k) > limits.score_max_draws:
        raise TooLarge(f"{len(x)} items x {max(1, k)} draws is {len(x) * max(1, k)} decoder "
                       f"rows; /score runs at most {limits.score_max_draws} "
                       f"(LATENTBANK_SCORE_MAX_DRAWS){bulk}")
    x = model_view(x, model.config["model"])
    encoded = await svc.inference.run(model.id, "encoder", model.encoder_sha256 or "",
                                      model.encoder_uri or "", x)
    got, source = await in_thread(_score_rows, svc, model, x, encoded["mu"],
                                  encoded["logvar"], k, seed)
    config = VAEConfig.from_dict(model.config["model"])
    kind = config.likelihood_kind(bool(np.isin(x, (0.0, 1.0)).all()))  # of these items
    best = got.log_px if got.log_px is not None else got.elbo
    answer: dict[str, Any] = {"n_items": len(x), "importance_samples": k, "elbo": got.elbo,
                              "reconstruction": got.reconstruction, "kl": got.kl,
                              "elbo_se": got.elbo_se, "log_px": got.log_px,
                              "log_px_se": got.log_px_se, "ess": got.ess,
                              "likelihood_kind": kind, "logits_source": source,
                              "bits_per_dim": bits_per_dim(best, config.input_size)
                              if kind == "discrete" else None}
    if fpr is not None:
        statistic = quantiles["statistic"]
        value = threshold_at(quantiles, fpr)
        figures = got.log_px if statistic == "log_px" else got.elbo
        split = threshold_split(model.summary or {})
        answer["threshold"] = {
            "fpr": fpr, "value": value, "statistic": statistic,
            "importance_samples": quantiles["importance_samples"],
            "heldout_items": quantiles["n_items"], "split": split,
            "note": None if split == "validation" else TRAINING_SPLIT_NOTE}
        answer["is_outlier"] = (figures < value).tolist()
    return Response(orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
