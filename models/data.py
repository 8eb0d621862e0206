"""Training data: numpy arrays or memory-mapped `.npy` files, read in batches.

Nothing here loads a whole dataset: validation scans in chunks and batches gather
only their own rows, so a file larger than RAM trains from its memory map.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from models.config import VAEConfig
from models.transforms import is_binary, model_input, prepare, value_problem

SCAN_CHUNK_BYTES = 64 << 20


class DataError(ValueError):
    """The data cannot be used: empty, wrong shape or dtype, non-finite or out of range."""


def open_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a `.npy` file read-only. Pickled (object) arrays are refused."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{os.fspath(path)}: not a plain numeric .npy array ({exc})") from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{os.fspath(path)}: expected one .npy array, got {type(array).__name__}")
    return array


def scan_chunks(array: np.ndarray, chunk_bytes: int = SCAN_CHUNK_BYTES,
                ) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first row, rows) over the array in chunks of about `chunk_bytes`."""
    row_bytes = max(1, array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, array.shape[0], step):
        yield start, np.asarray(array[start:start + step])


@dataclass(frozen=True)
class DataStats:
    n_items: int
    minimum: float
    maximum: float
    binary: bool  # every value is 0 or 1


def validate_array(array: np.ndarray, config: VAEConfig) -> DataStats:
    """Check `array` fits `config`: non-empty, numeric, item shape, finite, range.

    Values are checked (and the stats given) as the model sees them: a uint8 array holds
    8-bit items, x / 255 for most models, the integers 0 .. 255 for a dequantising one.
    Raises DataError naming the first problem (and the first offending item).
    """
    if not isinstance(array, np.ndarray):
        raise DataError(f"data must be a numpy array, got {type(array).__name__}")
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == np.bool_):
        raise DataError(f"data must be numeric; got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.complexfloating):
        raise DataError(f"data must be real-valued; got dtype {array.dtype}")
    if array.ndim == 0 or array.shape[0] == 0:
        raise DataError("data is empty: it has no items")
    item_shape = tuple(array.shape[1:])
    if item_shape != config.input_shape:
        if int(np.prod(item_shape, dtype=np.int64)) == config.input_size and config.family == "mlp":
            pass  # an mlp flattens items, so (N, 64) fits input_shape (1, 8, 8)
        else:
            raise DataError(f"item shape {list(item_shape)} does not match the model's "
                            f"input_shape {list(config.input_shape)}")
    lo, hi, binary = np.inf, -np.inf, True
    # chunks in the model's units (float32): a uint8 chunk grows fourfold when converted
    chunk_bytes = SCAN_CHUNK_BYTES * min(array.dtype.itemsize, 4) // 4
    for start, chunk in scan_chunks(array, chunk_bytes):
        flat = model_input(chunk, config).reshape(chunk.shape[0], -1)
        # NaN and infinities propagate into min/max, so one pass checks both; the
        # per-item search for the culprit runs only when something is wrong.
        c_lo, c_hi = float(flat.min()), float(flat.max())
        if not (np.isfinite(c_lo) and np.isfinite(c_hi)):
            bad = start + int(np.argmin(np.isfinite(flat).all(axis=1)))
            raise DataError(f"data has non-finite values (NaN or infinity) at item {bad}")
        lo, hi = min(lo, c_lo), max(hi, c_hi)
        problem = value_problem(flat, config)
        if problem is not None:
            raise DataError(problem[1].format(item=start + problem[0]))
        binary = binary and is_binary(flat)
    return DataStats(n_items=int(array.shape[0]), minimum=lo, maximum=hi, binary=binary)


def split_indices(n_items: int, val_fraction: float, seed: int,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split into (train, validation) row indices, each sorted."""
    n_val = round(n_items * val_fraction)
    if val_fraction > 0:
        n_val = max(1, n_val)
    if n_items - n_val < 1:
        raise DataError(f"{n_items} item(s) leave nothing to train on with "
                        f"val_fraction={val_fraction}")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n_items)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def gather_rows(array: np.ndarray, rows: np.ndarray, config: VAEConfig) -> torch.Tensor:
    """Read `rows` (any order) as a float32 tensor shaped (len(rows), *input_shape), in
    the model's units (models.transforms.model_input: 8-bit items stored as uint8 become
    x / 255, or the integers for a dequantising model).

    A memory map is read in sorted row order (sequential I/O); an in-memory array is
    indexed directly (one copy). Either way the result keeps the requested order. Rows
    are read in their stored dtype and converted once gathered: a uint8 batch reads a
    quarter of the bytes a float32 one would.
    """
    if not isinstance(array, np.memmap):
        raw = np.asarray(array[rows])
    else:
        order = np.argsort(rows, kind="stable")
        raw = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
        raw[order] = array[rows[order]]
    batch = model_input(raw, config)
    return torch.from_numpy(np.ascontiguousarray(batch).reshape(len(rows), *config.input_shape))


def model_rows(array: np.ndarray, rows: np.ndarray, config: VAEConfig,
               noise_seed: int | None = None) -> torch.Tensor:
    """`gather_rows`, then what the model sees of them (models.transforms.prepare: the
    evaluation copy of binarised or dequantised data unless `noise_seed` is given)."""
    batch = gather_rows(array, rows, config)
    if config.binarize == "none" and config.dequantize == "none":
        return batch
    return torch.from_numpy(prepare(batch.numpy(), rows, config, noise_seed))


def iter_batches(array: np.ndarray, rows: np.ndarray, batch_size: int, config: VAEConfig,
                 rng: np.random.Generator | None = None, noise_seed: int | None = None,
                 ) -> Iterator[torch.Tensor]:
    """Batches of `rows` as the model sees them (`model_rows`), shuffled by `rng` when
    given, in order otherwise."""
    if rng is not None:
        rows = rows[rng.permutation(len(rows))]
    for start in range(0, len(rows), batch_size):
        yield model_rows(array, rows[start:start + batch_size], config, noise_seed)


def load_digits_dataset() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, scaled to [0, 1]: images (1797, 1, 8, 8) float32, labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return images, digits.target.astype(np.int64)
