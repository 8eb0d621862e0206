"""What the model sees of an item: binarised or dequantised values, in NumPy (no torch) so that
the trainer, the embedding workers and the API's scoring share it. The noise depends only on
(seed, dataset row, position in the item), so an evaluation is reproducible however it is
split (docs/internals/likelihoods.md)."""

from __future__ import annotations

import math

import numpy as np

from models.config import VAEConfig

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    return z ^ (z >> np.uint64(31))


def uniform_noise(seed: int, rows: np.ndarray, item_size: int) -> np.ndarray:
    """u (len(rows), item_size) float64 in [0, 1): a SplitMix64 stream keyed by `seed`,
    element j of dataset row r at counter r * item_size + j."""
    with np.errstate(over="ignore"):
        key = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) * GOLDEN)[0]
        counter = (np.asarray(rows, dtype=np.uint64)[:, None] * np.uint64(item_size)
                   + np.arange(item_size, dtype=np.uint64)[None, :] + np.uint64(1))
        bits = _mix(key + counter * GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def binarize(x: np.ndarray, rows: np.ndarray, seed: int) -> np.ndarray:
    """1[u < x] as float32, shaped like x (values in [0, 1] are probabilities of a 1)."""
    u = uniform_noise(seed, rows, int(np.prod(x.shape[1:], dtype=np.int64)))
    return (u.reshape(x.shape) < x).astype(np.float32)


def dequantize(x: np.ndarray, rows: np.ndarray, seed: int, levels: int) -> np.ndarray:
    """(x + u) / levels as float32, shaped like x (x holds integers 0 .. levels - 1)."""
    u = uniform_noise(seed, rows, int(np.prod(x.shape[1:], dtype=np.int64)))
    return ((x.astype(np.float64) + u.reshape(x.shape)) / levels).astype(np.float32)


def dequantization_offset(item_size: int, levels: int) -> float:
    """-D log L: from the density of y = (x + u) / L to the log-probability of x (nats)."""
    return -item_size * math.log(levels)


def bits_per_dim(log_p: float | np.ndarray, item_size: int) -> float | np.ndarray:
    """-log P(x) / (D ln 2): a log-probability in nats as bits per dimension."""
    return -log_p / (item_size * math.log(2))


def prepare(x: np.ndarray, rows: np.ndarray, config: VAEConfig, seed: int | None = None,
            ) -> np.ndarray:
    """The values a model with `config` sees for items `x` of dataset rows
    `rows`: binarised or dequantised with noise from `seed` (default: the config's
    `data_seed`, the evaluation copy), unchanged when the config asks for neither."""
    if config.binarize == "none" and config.dequantize == "none":
        return x
    seed = config.data_seed if seed is None else seed
    if config.binarize != "none":
        return binarize(x, rows, seed)
    return dequantize(x, rows, seed, config.levels)


def training_seed(config: VAEConfig, train_seed: int, epoch: int) -> int | None:
    """The noise seed of a training epoch: None (the evaluation copy) for static
    binarisation or no transform, a fresh seed per epoch for dynamic binarisation and for
    dequantisation."""
    if config.binarize == "dynamic" or config.dequantize != "none":
        return int(np.random.SeedSequence([train_seed, epoch, 7]).generate_state(
            1, np.uint64)[0] >> np.uint64(1))
    return None


# likelihoods of values in [0, 1]; the discretised logistic bins a value between its grid's
# levels k / (L - 1) to the nearest, so any value in [0, 1] is one it can score
UNIT_INTERVAL = ("bernoulli", "continuous_bernoulli", "discretized_logistic")


def value_problem(flat: np.ndarray, config: VAEConfig) -> tuple[int, str] | None:
    """The first item of `flat` (N, D) whose values a model with `config` cannot take, and
    why; None when all fit. (0/1 and [0, 1] data for the Bernoulli kinds, [0, 1] for the
    discretised logistic, integers 0 .. L-1 for dequantisation.)"""
    if config.dequantize != "none":
        bad = ((flat < 0) | (flat > config.levels - 1) | (flat != np.round(flat))).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            return i, (f"uniform dequantisation takes integers 0 .. {config.levels - 1} "
                       f"(levels {config.levels}); item {{item}} has values in "
                       f"[{flat[i].min():g}, {flat[i].max():g}] (give the raw integer data, "
                       "or set levels)")
    elif config.likelihood in UNIT_INTERVAL:
        bad = ((flat < 0) | (flat > 1)).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            return i, (f"the {config.likelihood} likelihood needs values in [0, 1]; item "
                       f"{{item}} has values in [{flat[i].min():g}, {flat[i].max():g}] "
                       "(scale the data, or use 'gaussian')")
    return None


def is_binary(flat: np.ndarray) -> bool:
    """Every value is exactly 0 or 1."""
    return bool(((flat == 0) | (flat == 1)).all())


def range_problem(lo: float, hi: float, config: VAEConfig) -> str | None:
    """Why data whose values lie in [lo, hi] cannot go through a model with `config` (what
    `value_problem` finds item by item, decided from a dataset's stored range); None when
    the range fits. Integer-ness is not a range's to say: see `needs_value_scan`."""
    if config.dequantize != "none":
        if lo < 0 or hi > config.levels - 1:
            return (f"uniform dequantisation takes integers 0 .. {config.levels - 1} (levels "
                    f"{config.levels}); the values lie in [{lo:g}, {hi:g}]")
    elif config.likelihood in UNIT_INTERVAL and (lo < 0 or hi > 1):
        return (f"the {config.likelihood} likelihood"
                + (" (binarised)" if config.binarize != "none" else "")
                + f" needs values in [0, 1]; the values lie in [{lo:g}, {hi:g}]")
    return None


def needs_value_scan(source_dtype: str, config: VAEConfig) -> bool:
    """Whether data stored from `source_dtype` may hold values a model with `config` cannot
    take although its range fits: non-integers (grey floats) for a dequantising model, and
    8-bit items (uint8: their range reads [0, 1], the model sees 0 .. 255) for one with
    fewer than 256 levels. Other integer and boolean sources cannot; anything else must be
    looked at value by value (the stored values: the integers, for a dequantising model)."""
    if config.dequantize == "none":
        return False
    try:
        dtype = np.dtype(source_dtype)
    except TypeError:
        return True
    if dtype == np.uint8:
        return config.levels <= PIXEL_MAX
    return dtype.kind not in "biu"


# -- 8-bit storage -------------------------------------------------------------------------
#
# Datasets of 8-bit images are stored as uint8 (`datasets.dtype`). Their values, as every
# reader outside a model sees them (items pages, thumbnails, the API's inputs, the stored
# range), are x / 255 in [0, 1]; a model sees that scale too, except a dequantising one,
# which takes the integers 0 .. 255 (its `levels` must then be 256).

PIXEL_MAX = 255


def item_values(x: np.ndarray) -> np.ndarray:
    """Stored items as values: uint8 as x / 255 (float32), anything else as float32."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) * np.float32(1.0 / PIXEL_MAX)
    return np.asarray(x, dtype=np.float32)


def model_input(x: np.ndarray, config: VAEConfig) -> np.ndarray:
    """Stored items as a model with `config` takes them (before `prepare`): uint8 as the
    integers for a dequantising model, as x / 255 for any other; float32 unchanged."""
    if x.dtype == np.uint8 and config.dequantize != "none":
        return x.astype(np.float32)
    return item_values(x)
