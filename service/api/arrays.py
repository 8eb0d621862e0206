"""The arrays of requests and answers: checked, bounded (rows, values) and shaped as a model
sees its items; the decoder's mean; interpolation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from models.config import VAEConfig
from models.transforms import prepare, value_problem
from store.errors import Conflict, InvalidInput, TooLarge


def decoder_mean(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """The decoder's mean: Gaussian or continuous-Bernoulli means (`mean`; the latter's
    `probs` is its parameter lambda, not its mean), Bernoulli probabilities (`probs`)."""
    for name in ("mean", "probs"):
        if name in outputs:
            return outputs[name]
    raise Conflict("the decoder has neither a 'mean' nor a 'probs' output")


def is_image_shape(shape: tuple[int, ...] | list[int]) -> bool:
    """Items of this shape draw as images: (H, W), or (C, H, W) with 1 or 3 channels."""
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def model_view(x: np.ndarray, model_config: dict[str, Any]) -> np.ndarray:
    """Items as the model sees them: binarised or dequantised (models/transforms.py) with
    the model's `data_seed`, item i of the request keyed as row i, so the same request
    always gets the same answer; unchanged for models without a transform. Values the
    transform cannot take are a 422 naming the first such item."""
    config = VAEConfig.from_dict(model_config)
    if config.binarize == "none" and config.dequantize == "none":
        return x
    problem = value_problem(x.reshape(len(x), -1), config)
    if problem is not None:
        raise InvalidInput(problem[1].format(item=problem[0]))
    return prepare(x, np.arange(len(x)), config)


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation; falls back to linear for (nearly) parallel vectors."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return (1 - t)[:, None] * a + t[:, None] * b
    cos = float(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    omega = np.arccos(cos)
    if np.sin(omega) < 1e-6:
        return (1 - t)[:, None] * a + t[:, None] * b
    return (np.sin((1 - t) * omega)[:, None] * a + np.sin(t * omega)[:, None] * b) / np.sin(
        omega)


def item_values(model_config: dict[str, Any]) -> int:
    """Numbers in one of the model's items (one row of a decoder's answer)."""
    return math.prod(int(d) for d in model_config["input_shape"])


def check_rows(rows: int, max_rows: int, what: str) -> None:
    """Refuse (422) more than `max_rows` rows before anything is run."""
    if rows > max_rows:
        raise InvalidInput(f"'{what}' has {rows} rows; the limit is {max_rows} "
                           "(LATENTBANK_DECODE_MAX_ROWS)")


def check_answer(rows: int, per_row: int, max_values: int, what: str) -> None:
    """Refuse (413) an answer of more than `max_values` numbers before any work is done:
    a row limit alone lets a model with large items (or many repeated rows) make the API
    hold and serialise gigabytes for one request of a few bytes."""
    total = rows * per_row
    if total > max_values:
        raise TooLarge(f"{what}: {rows} rows x {per_row} values is {total} values; one "
                       f"answer carries at most {max_values} (LATENTBANK_MAX_RESPONSE_VALUES)"
                       "; ask for fewer rows per request")


def as_float_rows(value: Any, width: int | None, what: str, max_rows: int,
                  item_shape: list[int] | None = None) -> np.ndarray:
    """Validate a batch: 2-D (or item-shaped), finite, within the row limit."""
    if isinstance(value, np.ndarray) and value.ndim > 1:  # an .npy body: before a copy
        check_rows(int(value.shape[0]), max_rows, what)
    try:
        array = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        raise InvalidInput(f"'{what}' must be a rectangular array of numbers") from None
    if array.ndim == 1 and width is not None and array.shape[0] == width:
        array = array[None]
    if array.ndim == 0 or array.shape[0] == 0:
        raise InvalidInput(f"'{what}' must hold at least one row")
    check_rows(int(array.shape[0]), max_rows, what)
    if item_shape is not None:
        flat = int(np.prod(item_shape))
        if tuple(array.shape[1:]) != tuple(item_shape):
            if array.ndim == 2 and array.shape[1] == flat:
                array = array.reshape(len(array), *item_shape)
            else:
                raise InvalidInput(f"each row of '{what}' must have shape {item_shape} (or "
                                   f"{flat} values); got {list(array.shape[1:])}")
    elif array.ndim != 2 or array.shape[1] != width:
        got = list(array.shape[1:]) if array.ndim > 1 else [int(array.shape[0])]
        raise InvalidInput(f"each row of '{what}' must have {width} values (the model's "
                           f"latent_dim); got {got}")
    if not np.isfinite(array).all():
        raise InvalidInput(f"'{what}' has non-finite values (NaN or infinity)")
    return np.ascontiguousarray(array)


def as_vector(value: Any, width: int, what: str) -> np.ndarray:
    """One latent vector of `width` finite values."""
    array = np.asarray(value, dtype=np.float64)
    if array.shape != (width,):
        raise InvalidInput(f"'{what}' must have {width} values (the model's latent_dim); "
                           f"got {array.size}")
    if not np.isfinite(array).all():
        raise InvalidInput(f"'{what}' has non-finite values (NaN or infinity)")
    return array
