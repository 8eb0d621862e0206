"""/v1/models/{id}/...: onnxruntime serving (decode, sample, interpolate, traverse, encode,
reconstruct, score); which requests a model may serve is decided in serving_policy."""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response

from models.config import VAEConfig
from models.transforms import bits_per_dim
from service.api.arrays import (
    as_float_rows,
    check_answer,
    check_rows,
    decoder_mean,
    is_image_shape,
    item_values,
    model_view,
    slerp,
)
from service.api.codecs import (
    NPY,
    dumps_arrays,
    load_npy,
    media_type,
    npy_bytes,
    parse_json,
    read_body,
    wants,
)
from service.api.deps import ModelId, ReadKey, Services, SvcDep, in_thread
from service.api.error_responses import ERRORS, SERVE_ERRORS
from service.api.errors import ApiError
from service.api.images import (
    SCORE_FIELDS,
    image_body,
    image_input,
    is_image_request,
    read_upload,
    score_params,
)
from service.api.schemas.serving import (
    ArrayOut,
    DecodeRequest,
    EncodeOut,
    EncodeRequest,
    InterpolateRequest,
    SampleOut,
    SampleRequest,
    ScoreOut,
    TraverseOut,
    TraverseRequest,
)
from service.api.scoring import Scores, logits_source
from service.api.scoring import score as score_items
from service.api.serving_policy import (
    MAX_IMPORTANCE_SAMPLES,
    interpolation_ends,
    ready_model,
    score_draws,
    threshold_answer,
    traversal,
)
from store.tables import Model

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)
PNG = "image/png"
OCTETS = "application/octet-stream"


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


@router.post("/{model_id}/decode", openapi_extra=_serving_body("DecodeRequest"),
             responses=_answers(ArrayOut), response_class=Response,
             summary="Decode latent vectors to the decoder's mean")
async def decode(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId) -> Response:
    _array_body(request)
    raw = await read_body(request)
    model = await ready_model(svc, model_id)
    z = await _rows(raw, request, "z", DecodeRequest, model.config["model"]["latent_dim"],
                    svc.settings.decode_max_rows)
    check_answer(len(z), item_values(model.config["model"]), svc.settings.max_response_values,
                 "decode")
    return await _reply(request, {"x": await _decode(svc, model, z)}, image="x")


@router.post("/{model_id}/sample", responses=_answers(SampleOut), response_class=Response,
             summary="Decode draws from the prior N(0, temperature² I)")
async def sample(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId,
                 body: SampleRequest) -> Response:
    model = await ready_model(svc, model_id)
    check_rows(body.n, svc.settings.decode_max_rows, "n")
    dim = model.config["model"]["latent_dim"]
    check_answer(body.n, item_values(model.config["model"]) + dim,
                 svc.settings.max_response_values, "sample")
    rng = np.random.default_rng(body.seed)
    z = (body.temperature * rng.standard_normal((body.n, dim))).astype(np.float32)
    return await _reply(request, {"x": await _decode(svc, model, z), "z": z}, image="x")


@router.post("/{model_id}/interpolate", responses=_answers(SampleOut), response_class=Response,
             summary="Decode a path between two latent vectors or two stored items")
async def interpolate(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId,
                      body: InterpolateRequest) -> Response:
    model = await ready_model(svc, model_id)
    check_rows(body.steps, svc.settings.decode_max_rows, "steps")
    check_answer(body.steps, item_values(model.config["model"]) + model.config["model"][
        "latent_dim"], svc.settings.max_response_values, "interpolate")
    a, b = await in_thread(interpolation_ends, svc, model, body)
    t = np.linspace(0.0, 1.0, body.steps)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    z = slerp(a64, b64, t) if body.method == "slerp" else (1 - t)[:, None] * a64 + t[:, None] * b64
    z = z.astype(np.float32)
    return await _reply(request, {"x": await _decode(svc, model, z), "z": z}, image="x")


@router.post("/{model_id}/traverse", responses=_answers(TraverseOut), response_class=Response,
             summary="Move one latent dimension at a time from a base point; a PNG grid has "
                     "one row per dimension (most held-out KL first), one column per step")
async def traverse(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId,
                   body: TraverseRequest) -> Response:
    model = await ready_model(svc, model_id)
    z, dims, kl, offsets = await in_thread(traversal, svc, model, body)
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


async def _encoded(svc: Services, request: Request, model_id: int,
                   answer: Literal["encode", "reconstruct"],
                   ) -> tuple[Model, dict[str, np.ndarray]]:
    """The request's items (JSON or .npy, item-shaped) through the model's encoder, once
    the answer (mu and logvar, or the reconstructions) is known to be within its bound."""
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
    return model, out


@router.post("/{model_id}/encode", openapi_extra=_serving_body("EncodeRequest", {}),
             responses=_answers(EncodeOut), response_class=Response,
             summary="Posterior means and log-variances of items")
async def encode(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId) -> Response:
    _, out = await _encoded(svc, request, model_id, "encode")
    return await _reply(request, {"mu": out["mu"], "logvar": out["logvar"]})


@router.post("/{model_id}/reconstruct", openapi_extra=_serving_body("EncodeRequest"),
             responses=_answers(ArrayOut), response_class=Response,
             summary="Decode each item's posterior mean: the decoder's mean at mu(x)")
async def reconstruct(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId,
                      ) -> Response:
    model, out = await _encoded(svc, request, model_id, "reconstruct")
    return await _reply(request, {"x": await _decode(svc, model, out["mu"])}, image="x")


# -- scoring new items ---------------------------------------------------------------

SCORE_FORM = {"importance_samples": {"type": "integer", "minimum": 0, "maximum": 5000},
              "fpr": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
              "seed": {"type": "integer", "minimum": 0}}


def _score_rows(svc: Services, model: Model, x: np.ndarray, mu: np.ndarray,
                logvar: np.ndarray, importance_samples: int, seed: int | None,
                ) -> tuple[Scores, str | None]:
    """The items' scores, and where their (continuous) Bernoulli logits came from
    (service.api.scoring.logits_source: older files have no `logits` output)."""
    loaded = svc.inference.sessions.get(model.id, "decoder", model.decoder_sha256,
                                        model.decoder_uri)
    config = VAEConfig.from_dict(model.config["model"])

    def decode(z: np.ndarray) -> dict[str, np.ndarray]:
        with svc.inference.busy:  # no serving call runs on the event loop meanwhile
            outputs = loaded.session.run(loaded.output_names, {loaded.input_name: z})
        return dict(zip(loaded.output_names, outputs, strict=True))

    scores = score_items(decode, x, mu, logvar, config, importance_samples,
                         np.random.default_rng(seed))
    return scores, logits_source(loaded.output_names, config.likelihood)


async def _score_input(svc: Services, request: Request, model_id: int,
                       query: tuple[int | None, float | None, int | None],
                       ) -> tuple[Model, np.ndarray, tuple[int | None, float | None, int | None]]:
    """The model, the items to score and (importance_samples, fpr, seed): an image's come
    in its form fields, an array's in the query."""
    if is_image_request(request):  # one image, transformed as the model's dataset was
        model = await ready_model(svc, model_id)
        upload = await read_upload(request, SCORE_FIELDS)
        params = score_params(upload.fields)
        query = params.importance_samples, params.fpr, params.seed
        x = await image_input(svc, upload, model.dataset_id, model.config["model"])
        return model, x, query
    _array_body(request)
    raw = await read_body(request)
    model = await ready_model(svc, model_id)
    x = as_float_rows(_body_array(raw, request, "x", EncodeRequest), None, "x", 2**62,
                      item_shape=model.config["model"]["input_shape"])
    return model, x, query


def _score_answer(model: Model, x: np.ndarray, k: int, got: Scores, source: str | None,
                  fpr: float | None) -> dict[str, Any]:
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
        answer.update(threshold_answer(model, fpr, got))
    return answer


@router.post("/{model_id}/score", openapi_extra=_serving_body("EncodeRequest", SCORE_FORM),
             responses={200: {"model": ScoreOut}, **SERVE_ERRORS, 413: ERRORS[409]},
             response_class=Response,
             summary="ELBO, reconstruction, KL and log p(x) (with its Monte-Carlo error) of "
                     "new items; with fpr, a held-out threshold and is_outlier")
async def score(_: ReadKey, svc: SvcDep, request: Request, model_id: ModelId,
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
    model, x, (importance_samples, fpr, seed) = await _score_input(
        svc, request, model_id, (importance_samples, fpr, seed))
    k = score_draws(svc.settings, model, len(x), importance_samples, fpr)
    x = model_view(x, model.config["model"])
    encoded = await svc.inference.run(model.id, "encoder", model.encoder_sha256 or "",
                                      model.encoder_uri or "", x)
    got, source = await in_thread(_score_rows, svc, model, x, encoded["mu"],
                                  encoded["logvar"], k, seed)
    return Response(orjson.dumps(_score_answer(model, x, k, got, source, fpr),
                                 option=orjson.OPT_SERIALIZE_NUMPY),
                    media_type="application/json")
