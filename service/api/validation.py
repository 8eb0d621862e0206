"""Submissions checked at the API's edge, with the torch-free configuration module:
a training request becomes the normalised {"model", "training"} configuration that
`store.submit` writes, and a sweep's grid becomes one such configuration per point.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from models.config import ConfigError, TrainConfig, VAEConfig
from store.errors import InvalidInput

MAX_SWEEP = 64  # the defaults of LATENTBANK_SWEEP_MAX_CONFIGS and _FIELDS
MAX_FIELDS = 16


def training_config(dataset_item_shape: list[int], model: dict[str, Any],
                    training: dict[str, Any],
                    value_range: tuple[float, float] | None = None) -> dict[str, Any]:
    """The normalised configuration of a training request for a dataset's items, whose
    values lie in `value_range` when given (InvalidInput naming what is wrong; the worker
    checks every value again, this refuses at once what the range already rules out)."""
    if not isinstance(model, dict) or not isinstance(training, dict):
        raise InvalidInput("'model' and 'training' must be objects")
    spec = {"input_shape": list(dataset_item_shape), **model}
    try:
        model_cfg, train_cfg = VAEConfig.from_dict(spec), TrainConfig.from_dict(training)
    except ConfigError as exc:
        raise InvalidInput(str(exc)) from None
    item = tuple(dataset_item_shape)
    if model_cfg.input_shape != item and not (
            model_cfg.family == "mlp" and math.prod(item) == model_cfg.input_size):
        raise InvalidInput(f"model.input_shape {list(model_cfg.input_shape)} does not fit the "
                           f"dataset's items {list(item)}")
    if value_range is not None:
        lo, hi = value_range
        if model_cfg.dequantize != "none" and (lo < 0 or hi > model_cfg.levels - 1):
            raise InvalidInput(f"model.dequantize: uniform dequantisation takes integers 0 .. "
                               f"{model_cfg.levels - 1} (levels {model_cfg.levels}); the "
                               f"dataset's values lie in [{lo:g}, {hi:g}]")
        if (model_cfg.dequantize == "none" and model_cfg.likelihood != "gaussian"
                and (lo < 0 or hi > 1)):
            raise InvalidInput(f"model.likelihood: {model_cfg.likelihood} needs values in "
                               f"[0, 1]; the dataset's values lie in [{lo:g}, {hi:g}]")
    return {"model": model_cfg.to_dict(), "training": train_cfg.to_dict()}


def expand_grid(grid: dict[str, list[Any]], max_configs: int = MAX_SWEEP,
                max_fields: int = MAX_FIELDS) -> list[dict[str, Any]]:
    """{"model.latent_dim": [2, 8], "model.beta": [1, 4]} -> 4 override dicts.

    The grid's size is the product of its lists' lengths, computed (and refused past
    `max_configs`) before anything is expanded: a grid of a few hundred bytes can name
    millions of points, and building them is what a caller could make the API do."""
    if not isinstance(grid, dict) or not grid:
        raise InvalidInput("sweep must be a non-empty object of 'model.x' / 'training.x' lists")
    if len(grid) > max_fields:
        raise InvalidInput(f"sweep varies {len(grid)} fields; the limit is {max_fields} "
                           "(LATENTBANK_SWEEP_MAX_FIELDS)")
    for name, values in grid.items():
        section, _, field = name.partition(".")
        if section not in ("model", "training") or not field:
            raise InvalidInput(f"sweep key {str(name)[:100]!r} must look like "
                               "'model.<field>' or 'training.<field>'")
        if not isinstance(values, list) or not values:
            raise InvalidInput(f"sweep values for {name!r} must be a non-empty list")
    size = math.prod(len(values) for values in grid.values())
    if size > max_configs:
        shape = " x ".join(str(len(values)) for values in grid.values())
        raise InvalidInput(f"sweep has {size} configurations ({shape} values); the limit is "
                           f"{max_configs} (LATENTBANK_SWEEP_MAX_CONFIGS)")
    return [dict(zip(grid, values, strict=True))
            for values in itertools.product(*grid.values())]


def sweep_configs(dataset_item_shape: list[int], model: dict[str, Any],
                  training: dict[str, Any], grid: dict[str, list[Any]],
                  value_range: tuple[float, float] | None = None, *,
                  max_configs: int = MAX_SWEEP, max_fields: int = MAX_FIELDS,
                  ) -> list[dict[str, Any]]:
    """One normalised configuration per grid point; all are validated before any is used
    (the API runs this in a worker thread: up to `max_configs` validations)."""
    configs = []
    for overrides in expand_grid(grid, max_configs, max_fields):
        m, t = dict(model), dict(training)
        for name, value in overrides.items():
            section, _, field = name.partition(".")
            (m if section == "model" else t)[field] = value
        configs.append(training_config(dataset_item_shape, m, t, value_range))
    return configs
