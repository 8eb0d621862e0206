"""Models: training submissions, and serving (decode, sample, encode, score, traverse)."""

from __future__ import annotations

import datetime as dt
import mimetypes
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from latentbank_client._core import (
    NPY,
    Call,
    Plan,
    float_rows,
    ident,
    load_npy,
    npy_bytes,
    ref,
    submission,
)
from latentbank_client._jobs import LINKED, Bound, Job, Resource
from latentbank_client.display import PNG, curves_figure, html_table, pyplot
from latentbank_client.errors import InvalidInput
from latentbank_client.results import (
    Encoded,
    MetricRow,
    Sample,
    Scores,
    Traversal,
    build,
)

PNG_TYPE = "image/png"

def image_part(image: Any) -> tuple[str, Any, str]:
    """A multipart `image` part from a path or bytes (PNG, JPEG or WebP)."""
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        kind = ("image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else
                "image/jpeg" if data[:3] == b"\xff\xd8\xff" else
                "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream")
        return "image", lambda: data, kind
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        if not path.is_file():
            raise InvalidInput(f"image {str(path)!r} is not a file")
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.name, lambda: open(path, "rb"), kind
    raise InvalidInput(f"image must be a file path or bytes; got {type(image).__name__}")


@dataclass(kw_only=True)
class Model(Bound):
    """A trained (or training) VAE (server schema ModelOut). Serving methods need it
    `ready`; they take and return numpy arrays (sent as .npy where the API takes it)."""

    id: int
    dataset_id: int | None = None
    status: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] | None = None
    sweep_id: str | None = None
    encoder_sha256: str | None = None
    decoder_sha256: str | None = None
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def latent_dim(self) -> int | None:
        """The latent space's dimension."""
        return (self.config.get("model") or {}).get("latent_dim")

    @property
    def item_shape(self) -> tuple[int, ...] | None:
        """The shape of one item, as the model takes and makes them."""
        shape = (self.config.get("model") or {}).get("input_shape")
        return tuple(shape) if shape is not None else None

    def _path(self, tail: str) -> str:
        return f"/v1/models/{self.id}/{tail}"

    def decode(self, z: Any) -> np.ndarray:
        """The decoder's mean for latent points `z` (n, latent_dim): (n, *item_shape)."""
        rows = float_rows(z, "z", self.latent_dim)

        def plan() -> Plan:
            response = yield Call("POST", self._path("decode"), content=npy_bytes(rows),
                                  headers={"Content-Type": NPY, "Accept": NPY}, safe=True)
            return load_npy(response.content)
        return self._run(plan())

    def decode_png(self, z: Any) -> PNG:
        """The decoder's means for latent points `z` (n, latent_dim) as one PNG grid of
        images (the server draws it; shown inline by a notebook)."""
        rows = float_rows(z, "z", self.latent_dim)

        def plan() -> Plan:
            response = yield Call("POST", self._path("decode"), content=npy_bytes(rows),
                                  headers={"Content-Type": NPY, "Accept": PNG_TYPE},
                                  safe=True)
            return PNG(response.content)
        return self._run(plan())

    def sample(self, n: int = 16, seed: int | None = None, temperature: float = 1.0,
               return_latents: bool = False) -> Any:
        """`n` items decoded from prior draws N(0, temperature² I): an array of
        (n, *item_shape); with `return_latents`, a `Sample` (x and the draws z)."""
        body = {"n": n, "seed": seed, "temperature": temperature}

        def plan() -> Plan:
            if return_latents:
                response = yield Call("POST", self._path("sample"), json=body, safe=True)
                return build(Sample, response.json())
            response = yield Call("POST", self._path("sample"), json=body,
                                  headers={"Accept": NPY}, safe=True)
            return load_npy(response.content)
        return self._run(plan())

    def sample_png(self, n: int = 16, seed: int | None = None,
                   temperature: float = 1.0) -> PNG:
        """`n` items decoded from prior draws (as `sample`), as one PNG grid."""
        body = {"n": n, "seed": seed, "temperature": temperature}

        def plan() -> Plan:
            response = yield Call("POST", self._path("sample"), json=body,
                                  headers={"Accept": PNG_TYPE}, safe=True)
            return PNG(response.content)
        return self._run(plan())

    def _items_call(self, tail: str, x: Any, image: Any, params: dict[str, Any] | None,
                    accept: str = "application/json") -> Call:
        if (x is None) == (image is None):
            raise InvalidInput("give exactly one of x (items) and image=")
        if image is not None:
            filename, opener, kind = image_part(image)
            data = {k: str(v) for k, v in (params or {}).items() if v is not None}
            return Call("POST", self._path(tail), files={"image": (filename, opener, kind)},
                        data=data, headers={"Accept": accept}, safe=True)
        array = float_rows(x, "x")
        if self.item_shape is not None and array.shape == self.item_shape:
            array = array[None]  # one item
        return Call("POST", self._path(tail), content=npy_bytes(array), params=params,
                    headers={"Content-Type": NPY, "Accept": accept}, safe=True)

    def encode(self, x: Any = None, *, image: Any = None) -> Encoded:
        """Posterior means and log-variances of items `x` (n, *item_shape) or of one
        `image` (a path or bytes, transformed as the model's dataset's images were)."""
        call = self._items_call("encode", x, image, None)

        def plan() -> Plan:
            response = yield call
            return build(Encoded, response.json())
        return self._run(plan())

    def reconstruct(self, x: Any) -> np.ndarray:
        """Each item decoded from its posterior mean: (n, *item_shape)."""
        call = self._items_call("reconstruct", x, None, None, accept=NPY)

        def plan() -> Plan:
            response = yield call
            return load_npy(response.content)
        return self._run(plan())

    def score(self, x: Any = None, *, image: Any = None, fpr: float | None = None,
              importance_samples: int | None = None, seed: int | None = None) -> Scores:
        """ELBO terms and (with K = `importance_samples` > 0) log p(x) of new items, as
        numpy arrays; with `fpr`, the held-out threshold and `is_outlier` per item (K
        then defaults to the one the threshold was taken with)."""
        if fpr is not None and not 0 < fpr <= 0.5:
            raise InvalidInput(f"fpr must lie in (0, 0.5]; got {fpr}")
        call = self._items_call("score", x, image, {
            "fpr": fpr, "importance_samples": importance_samples, "seed": seed})

        def plan() -> Plan:
            response = yield call
            return Scores.of(response.json())
        return self._run(plan())

    def traverse(self, z: Any = None, *, embedding_set: Any = None, key: str | None = None,
                 dims: list[int] | None = None, top: int = 8, steps: int = 9,
                 span: float = 3.0) -> Traversal:
        """Move one latent dimension at a time from a base point (`z`, or item `key` of
        `embedding_set`, else the prior mean): `Traversal.x` holds len(dims) x steps
        decoded items, the most informative dimensions first unless `dims` is given."""
        body = self._traverse_body(z, embedding_set, key, dims, top, steps, span)

        def plan() -> Plan:
            response = yield Call("POST", self._path("traverse"), json=body, safe=True)
            return build(Traversal, response.json())
        return self._run(plan())

    def traverse_png(self, z: Any = None, *, embedding_set: Any = None,
                     key: str | None = None, dims: list[int] | None = None, top: int = 8,
                     steps: int = 9, span: float = 3.0) -> PNG:
        """The traversal of `traverse` as one PNG grid: a row per dimension, a column per
        step."""
        body = self._traverse_body(z, embedding_set, key, dims, top, steps, span)

        def plan() -> Plan:
            response = yield Call("POST", self._path("traverse"), json=body,
                                  headers={"Accept": PNG_TYPE}, safe=True)
            return PNG(response.content)
        return self._run(plan())

    def _traverse_body(self, z: Any, embedding_set: Any, key: str | None,
                       dims: list[int] | None, top: int, steps: int, span: float,
                       ) -> dict[str, Any]:
        body: dict[str, Any] = {"top": top, "steps": steps, "span": span}
        if z is not None:
            body["z"] = float_rows(z, "z", self.latent_dim)[0].tolist()
        if embedding_set is not None or key is not None:
            if embedding_set is None or key is None:
                raise InvalidInput("embedding_set= and key= go together")
            body["embedding_id"] = ref(embedding_set, "embedding_set")
            body["key"] = str(key)
        if dims is not None:
            body["dims"] = [int(d) for d in dims]
        return body

    def interpolate(self, z_from: Any = None, z_to: Any = None, *, embedding_set: Any = None,
                    from_key: str | None = None, to_key: str | None = None, steps: int = 8,
                    method: str = "linear") -> Sample:
        """Decoded points on a path between two latent points, or two stored items'
        means (`embedding_set` with `from_key` and `to_key`); `method` linear or slerp."""
        body: dict[str, Any] = {"steps": steps, "method": method}
        if z_from is not None or z_to is not None:
            body["z_from"] = float_rows(z_from, "z_from", self.latent_dim)[0].tolist()
            body["z_to"] = float_rows(z_to, "z_to", self.latent_dim)[0].tolist()
        if embedding_set is not None:
            body["embedding_id"] = ref(embedding_set, "embedding_set")
            body["from_key"], body["to_key"] = from_key, to_key

        def plan() -> Plan:
            response = yield Call("POST", self._path("interpolate"), json=body, safe=True)
            return build(Sample, response.json())
        return self._run(plan())

    def metrics(self) -> list[MetricRow]:
        """Per-epoch figures, train and validation (nats per item)."""
        def plan() -> Plan:
            response = yield Call("GET", self._path("metrics"))
            return [build(MetricRow, r) for r in response.json()]
        return self._run(plan())

    def onnx(self, role: str = "decoder") -> bytes:
        """The verified ONNX file of the `encoder` or `decoder`."""
        if role not in ("encoder", "decoder"):
            raise InvalidInput(f"role must be 'encoder' or 'decoder'; got {role!r}")

        def plan() -> Plan:
            response = yield Call("GET", self._path(f"onnx/{role}"))
            return response.content
        return self._run(plan())

    def curves_png(self) -> PNG:
        """The server's PNG of the training curves (shown inline by a notebook)."""
        def plan() -> Plan:
            response = yield Call("GET", self._path("plots/curves.png"))
            return PNG(response.content)
        return self._run(plan())

    def plot_curves(self) -> Any:
        """A matplotlib figure of the training curves (from `metrics()`); without
        matplotlib, the server's PNG (`curves_png()`)."""
        if pyplot() is None:
            return self.curves_png()

        def plan() -> Plan:
            response = yield Call("GET", self._path("metrics"))
            return curves_figure([build(MetricRow, r) for r in response.json()])
        return self._run(plan())

    def delete(self) -> None:
        """Delete the model with its metrics, sets and files (409 while aliased or used)."""
        return self._run(_delete(str(self.id)))

    def _repr_html_(self) -> str:
        model = self.config.get("model") or {}
        training = self.config.get("training") or {}
        summary = self.summary or {}
        figures = [(f"held-out {name}", summary.get(f"heldout_{name}"))
                   for name in ("elbo", "log_px", "log_px_se", "bits_per_dim")]
        return html_table(f"latentbank model {self.id}", [
            ("status", self.status), ("dataset", self.dataset_id),
            ("family", model.get("family")), ("latent dim", model.get("latent_dim")),
            ("hidden", model.get("hidden")), ("likelihood", model.get("likelihood")),
            ("epochs", summary.get("epochs_run", training.get("epochs"))),
            *figures, ("train seconds", summary.get("train_seconds")),
            ("created", self.created_at)])


def get_model(client: Any, model: Any) -> Plan:
    response = yield Call("GET", f"/v1/models/{model}")
    return build(Model, response.json(), client)


LINKED["model_id"] = get_model


def _delete(model: str) -> Plan:
    yield Call("DELETE", f"/v1/models/{model}")


class Models(Resource):
    """`client.models`: train, get (by id or '@alias'), list, delete models."""

    def train(self, dataset: Any, model: dict[str, Any] | None = None,
              training: dict[str, Any] | None = None, *,
              idempotency_key: str | None = None,
              registered_model: str | None = None) -> Job:
        """Queue a training job on `dataset` (an id or a Dataset): `model` and `training`
        are the dicts of POST /v1/training-jobs (`{"family": "mlp", "latent_dim": 8,
        "hidden": [256, 128], ...}`, `{"epochs": 20, ...}`). Sent with an Idempotency-Key
        (a fresh one unless given), so the client's retries never make two jobs. With the
        server's MLflow bridge, `registered_model` names the MLflow registered model the
        trained model becomes a version of (default: the dataset's name)."""
        if not isinstance(model, dict):
            raise InvalidInput("model= must be a dict of model settings, e.g. "
                               "{'family': 'mlp', 'latent_dim': 8}")
        if training is not None and not isinstance(training, dict):
            raise InvalidInput("training= must be a dict of training settings")
        body = {"dataset_id": ident(dataset, "dataset"), "model": model,
                "training": training or {}}
        if registered_model is not None:
            body["registered_model"] = registered_model

        def plan() -> Plan:
            response = yield Call("POST", "/v1/training-jobs", json=body,
                                  headers=submission(None, idempotency_key))
            return build(Job, response.json(), self._client)
        return self._run(plan())

    def sweep(self, dataset: Any, model: dict[str, Any], training: dict[str, Any] | None,
              grid: dict[str, list[Any]], *, idempotency_key: str | None = None,
              registered_model: str | None = None) -> list[Job]:
        """Queue a grid of training jobs (`grid`: 'model.<field>' or 'training.<field>'
        to the values to try); the jobs share a `sweep_id` (in MLflow, with the bridge:
        one parent run, a child run per job)."""
        body = {"dataset_id": ident(dataset, "dataset"), "model": model,
                "training": training or {}, "grid": grid}
        if registered_model is not None:
            body["registered_model"] = registered_model

        def plan() -> Plan:
            response = yield Call("POST", "/v1/sweeps", json=body,
                                  headers=submission(None, idempotency_key))
            return [build(Job, j, self._client) for j in response.json()["jobs"]]
        return self._run(plan())

    def get(self, model: Any) -> Model:
        """One model by id or '@alias'."""
        return self._run(get_model(self._client, ref(model, "model")))

    def __getitem__(self, model: Any) -> Model:
        return self.get(model)

    def list(self, status: str | None = None, dataset_id: int | None = None,
             sweep_id: str | None = None, limit: int = 100, offset: int = 0) -> list[Model]:
        """Models, newest first, optionally of one status, dataset or sweep."""
        def plan() -> Plan:
            response = yield Call("GET", "/v1/models", params={
                "status": status, "dataset_id": dataset_id, "sweep_id": sweep_id,
                "limit": limit, "offset": offset})
            return [build(Model, m, self._client) for m in response.json()]
        return self._run(plan())

    def delete(self, model: Any) -> None:
        """Delete a model (by id or '@alias')."""
        return self._run(_delete(ref(model, "model")))
