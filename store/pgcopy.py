"""The PGCOPY binary encoding of `latents` rows, assembled by numpy as one structured array
per chunk (no per-row Python), so the database, not the client, limits a bulk write."""

from __future__ import annotations

from typing import Any

import numpy as np


def copy_columns(vectors: tuple[str, str] = ("mu", "logvar")) -> str:
    """The columns of a COPY, in the order `copy_rows` writes them; `vectors` names the
    pair of columns the set stores its vectors in (store/vectors.py)."""
    return (f"set_id, item_index, dataset_id, dataset_index, {vectors[0]}, {vectors[1]}, "
            "elbo, reconstruction, kl, log_px, log_px_se, ess")


OPTIONAL = ("log_px", "log_px_se", "ess")  # NULL when not given (K = 0; se also at K = 1)
PGCOPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
PGCOPY_TRAILER = (-1).to_bytes(2, "big", signed=True)


def _copy_dtype(dim: int, present: tuple[bool, ...], half: bool = False) -> np.dtype:
    """One PGCOPY binary row: field count, then (length, value) per column, big-endian."""
    fields: list[tuple[str, Any]] = [("nfields", ">i2")]
    for name, kind in (("set_id", ">i8"), ("item_index", ">i8"), ("dataset_id", ">i8"),
                       ("dataset_index", ">i8")):
        fields += [(f"{name}_len", ">i4"), (name, kind)]
    # pgvector's binary vector: int16 dim, int16 unused, float4[dim] (halfvec: float2[dim])
    for name in ("mu", "logvar"):
        fields += [(f"{name}_len", ">i4"), (f"{name}_dim", ">i2"), (f"{name}_unused", ">i2"),
                   (name, ">f2" if half else ">f4", (dim,))]
    for name in ("elbo", "reconstruction", "kl"):
        fields += [(f"{name}_len", ">i4"), (name, ">f8")]
    for name, given in zip(OPTIONAL, present, strict=True):
        fields += [(f"{name}_len", ">i4")] + ([(name, ">f8")] if given else [])
    return np.dtype(fields)


def copy_rows(set_id: int, first_index: int, mu: np.ndarray, logvar: np.ndarray,
              elbo: np.ndarray, reconstruction: np.ndarray, kl: np.ndarray,
              log_px: np.ndarray | None, part: tuple[int, int] = (0, 0),
              log_px_se: np.ndarray | None = None, ess: np.ndarray | None = None,
              half: bool = False) -> bytes:
    """The PGCOPY binary body (no header) of one chunk of latents; `part` is the items'
    (dataset id, first position in the set); `half`: the vectors as float16 (halfvec,
    rounded to nearest; the caller checks they fit)."""
    n, dim = mu.shape
    optional = (log_px, log_px_se, ess)
    rows = np.empty(n, dtype=_copy_dtype(dim, tuple(v is not None for v in optional), half))
    rows["nfields"] = 12
    rows["set_id_len"], rows["set_id"] = 8, set_id
    rows["item_index_len"], rows["item_index"] = 8, np.arange(first_index, first_index + n)
    rows["dataset_id_len"], rows["dataset_id"] = 8, part[0]
    rows["dataset_index_len"] = 8
    rows["dataset_index"] = np.arange(first_index - part[1], first_index - part[1] + n)
    for name, values in (("mu", mu), ("logvar", logvar)):
        width = 2 if half else 4
        rows[f"{name}_len"], rows[f"{name}_dim"], rows[f"{name}_unused"] = 4 + width * dim, dim, 0
        rows[name] = values
    for name, values in (("elbo", elbo), ("reconstruction", reconstruction), ("kl", kl)):
        rows[f"{name}_len"], rows[name] = 8, values
    for name, values in zip(OPTIONAL, optional, strict=True):
        if values is None:
            rows[f"{name}_len"] = -1  # NULL
        else:
            rows[f"{name}_len"], rows[name] = 8, values
    return rows.tobytes()
