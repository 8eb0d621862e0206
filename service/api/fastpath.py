"""The decode hot path: `POST /v1/models/{id}/decode` answered without the framework's
per-request machinery when everything it needs is already known to this process; anything
else goes to the FastAPI route, so errors come from one place (docs/internals/serving.md)."""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import numpy as np
import orjson
from starlette.concurrency import run_in_threadpool

from service.api.arrays import as_float_rows, check_answer, decoder_mean, item_values
from service.api.codecs import NPY, dumps_arrays, load_npy, npy_bytes, npy_header
from service.api.deps import Services

log = logging.getLogger("latentbank.api")

ROUTE = "/v1/models/{model_id}/decode"
_PATH = re.compile(r"/v1/models/([1-9][0-9]{0,17})/decode")
_JSON = b"application/json"
_NPY_TYPES = (NPY.encode(), b"application/octet-stream")
# Above this size an .npy answer goes out as header + the array's own buffer. Servers
# take any bytes-like body (uvicorn, h11, the test client); below it one joined bytes
# object is cheaper than a second send.
_ZERO_COPY_BYTES = 1 << 16
# JSON bodies larger than this go to the route, which parses them off the event loop;
# JSON answers of more numbers than this are serialised in a worker thread.
_INLINE_JSON_BYTES = 1 << 16
_INLINE_VALUES = 1 << 16


class FastDecode:
    def __init__(self, app: Any, services: Services) -> None:
        self.app, self.svc = app, services
        self.latency = services.metrics.latency.labels("POST", ROUTE, "200").observe

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        found = (_PATH.fullmatch(scope["path"])
                 if scope["type"] == "http" and scope["method"] == "POST" else None)
        plan = self._plan(scope, int(found[1])) if found else None
        if plan is None:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        model, npy_in, npy_out = plan
        body = await _read(receive)
        if body is None:  # the client went away
            return
        try:
            payload = await self._decode(model, body, npy_in, npy_out)
        except Exception as exc:  # the route answers it, with its own words
            log.debug("fast decode declined: %s", exc)
            await self.app(scope, _replay(body, receive), send)
            return
        size = sum(len(part) for part in payload)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", _NPY_TYPES[0] if npy_out else _JSON),
            (b"content-length", str(size).encode())]})
        for i, part in enumerate(payload):
            await send({"type": "http.response.body", "body": part,
                        "more_body": i < len(payload) - 1})
        seconds = time.perf_counter() - started
        self.latency(seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request method=POST route=%s status=200 ms=%.2f", ROUTE, 1000 * seconds)

    def _plan(self, scope: dict[str, Any], model_id: int) -> tuple[Any, bool, bool] | None:
        """(model, .npy body?, .npy answer?) when this request can take the fast path."""
        # Authenticate, outside this middleware, has made every key check, limit and
        # refusal before a byte of the body is read: only what it verified is taken here.
        verified = scope.get("state") or {}
        if "read" not in verified.get("scopes", ()):
            return None  # not verified here: the route answers (401/403)
        kind = accept = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                kind = value.split(b";", 1)[0].strip().lower()
            elif name == b"accept":
                accept = value
            elif name == b"content-length":
                length = value
        svc = self.svc
        if (length is None or not length.isdigit()
                or int(length) > svc.settings.max_request_bytes):
            return None
        if kind is None or kind == _JSON:
            if int(length) > _INLINE_JSON_BYTES:
                return None  # parsed by the route, in a worker thread
            npy_in = False
        elif kind in _NPY_TYPES:
            npy_in = True
        else:
            return None
        if accept is None or NPY.encode() not in accept:
            # what `wants` decides: PNG and unknown types go to the route
            if accept and (b"image/png" in accept or not (
                    b"*" in accept or _JSON in accept)):
                return None
            npy_out = False
        else:
            npy_out = True
        model = svc.ready_models.get(model_id)
        return None if model is None else (model, npy_in, npy_out)

    async def _decode(self, model: Any, body: bytes, npy_in: bool, npy_out: bool,
                      ) -> tuple[bytes | memoryview, ...]:
        """The answer's body, in parts: a large .npy answer is its header, then the
        decoder's output buffer itself (no copy on this side of the socket)."""
        if npy_in:
            z: Any = load_npy(body, "z")
        else:
            doc = orjson.loads(body)
            if not isinstance(doc, dict) or doc.keys() != {"z"}:
                raise ValueError("not a plain {'z': ...} body")
            z = doc["z"]
        settings = self.svc.settings
        z = as_float_rows(z, model.config["model"]["latent_dim"], "z", settings.decode_max_rows)
        check_answer(len(z), item_values(model.config["model"]), settings.max_response_values,
                     "decode")  # the route's limits, checked before the decoder runs
        out = await self.svc.inference.run(model.id, "decoder", model.decoder_sha256 or "",
                                           model.decoder_uri or "", z)
        x = decoder_mean(out)
        if not npy_out:
            if x.size > _INLINE_VALUES:
                return (await run_in_threadpool(dumps_arrays, {"x": x}),)
            return (dumps_arrays({"x": x}),)
        if x.nbytes < _ZERO_COPY_BYTES or not x.flags.c_contiguous:
            return (npy_bytes(x),)
        return npy_header(x.dtype, x.shape), memoryview(x.reshape(-1).view(np.uint8))


async def _read(receive: Any) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _replay(body: bytes, receive: Any) -> Any:
    """A `receive` that hands the route the body already read, then the real channel."""
    sent = False

    async def again() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
