"""Writing a set's latent rows: one shard per transaction, streamed through binary COPY, so
a shard written twice leaves one row per item and a failed one leaves the previous state."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sqlalchemy import Connection, text

from store.db import Database
from store.embedding_sets import part_at
from store.errors import InvalidInput
from store.pgcopy import PGCOPY_HEADER, PGCOPY_TRAILER, copy_columns, copy_rows
from store.vectors import check_half, vector_columns


def _copy_target(conn: Connection, set_id: int) -> tuple[str, bool]:
    """The columns a COPY of the set's rows names, and whether its vectors are halfvec."""
    vector_type = conn.execute(text("SELECT vector_type FROM embedding_sets WHERE id = :s"),
                               {"s": set_id}).scalar() or "vector"
    return copy_columns(vector_columns(vector_type)), vector_type == "halfvec"


def _check_chunk(mu: np.ndarray, arrays: dict[str, Any], half: bool) -> np.ndarray:
    mu = np.asarray(mu, dtype=np.float32)
    if mu.ndim != 2 or len(mu) == 0:
        raise InvalidInput(f"mu must be a non-empty (n, dim) array; got shape {mu.shape}")
    for name, values in arrays.items():
        if values is not None and len(values) != len(mu):
            raise InvalidInput(f"{name} has {len(values)} rows, mu has {len(mu)}")
    for name, values in {"mu": mu, **arrays}.items():
        if values is not None and not np.isfinite(values).all():
            raise InvalidInput(f"{name} has non-finite values")
    if half:
        check_half("mu", mu)
        check_half("logvar", np.asarray(arrays["logvar"], np.float32))
    return mu


@contextmanager
def latent_writer(db: Database, set_id: int, first_index: int, n_rows: int,
                  guard: Callable[[Connection], None] | None = None,
                  keep_written: bool = False) -> Iterator[Callable[..., None] | None]:
    """Stream one shard, items `first_index .. first_index + n_rows - 1`, into one COPY.

    Idempotent per shard: in one transaction the shard's rows are deleted, then the
    chunks given to `write(mu, logvar, elbo, reconstruction, kl, log_px=None,
    log_px_se=None, ess=None)` are
    COPYed as they come (the server parses them while the caller computes the next),
    and the transaction commits only if exactly `n_rows` rows were written. Writing a
    shard twice therefore leaves one row per item; a failure leaves the previous state.
    `guard(conn)` runs first inside the transaction (a job's lease check).

    One writer of a shard at a time: a second delivery of it (the broker's, or one
    maintenance sent) waits for the first's transaction to end instead of failing on
    the rows' keys. With `keep_written`, a shard that then holds all its rows yields
    None and writes nothing (the caller computes nothing).
    """
    written = 0
    part = part_at(db, set_id, first_index)  # a shard never spans two parts
    with db.engine.begin() as conn:
        if guard is not None:
            guard(conn)
        conn.execute(text("SELECT pg_advisory_xact_lock(:s, :a)"),  # (int4, int4) keys
                     {"s": set_id % 2**31, "a": first_index % 2**31})
        columns, half = _copy_target(conn, set_id)
        if keep_written and conn.execute(text(
                "SELECT count(*) FROM latents WHERE set_id = :s AND item_index >= :a "
                "AND item_index < :b"),
                {"s": set_id, "a": first_index, "b": first_index + n_rows}).scalar() == n_rows:
            yield None
            return
        conn.execute(text("DELETE FROM latents WHERE set_id = :s AND item_index >= :a "
                          "AND item_index < :b"),
                     {"s": set_id, "a": first_index, "b": first_index + n_rows})
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy(f"COPY latents ({columns}) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.write(PGCOPY_HEADER)

            def write(mu: np.ndarray, logvar: np.ndarray, elbo: np.ndarray,
                      reconstruction: np.ndarray, kl: np.ndarray,
                      log_px: np.ndarray | None = None, log_px_se: np.ndarray | None = None,
                      ess: np.ndarray | None = None) -> None:
                nonlocal written
                mu = _check_chunk(mu, {"logvar": logvar, "elbo": elbo,
                                       "reconstruction": reconstruction, "kl": kl,
                                       "log_px": log_px, "log_px_se": log_px_se, "ess": ess},
                                  half)
                if written + len(mu) > n_rows:
                    raise InvalidInput(f"shard of {n_rows} rows got {written + len(mu)}")
                copy.write(copy_rows(set_id, first_index + written, mu,
                                     np.asarray(logvar, np.float32), elbo, reconstruction, kl,
                                     log_px, part, log_px_se, ess, half))
                written += len(mu)

            yield write
            copy.write(PGCOPY_TRAILER)
        if written != n_rows:
            raise InvalidInput(f"shard of {n_rows} rows got only {written}")


def unwritten(db: Database, set_id: int, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ranges `[a, b)` of item positions that do not hold all their rows yet (one
    statement: a count per range over the set's (set_id, item_index) key)."""
    if not ranges:
        return []
    with db.engine.connect() as conn:
        short = conn.execute(text(
            "SELECT r.a, r.b FROM unnest(CAST(:a AS bigint[]), CAST(:b AS bigint[])) AS r(a, b) "
            "WHERE (SELECT count(*) FROM latents WHERE set_id = :s AND item_index >= r.a "
            "AND item_index < r.b) < r.b - r.a ORDER BY r.a"),
            {"s": set_id, "a": [a for a, _ in ranges], "b": [b for _, b in ranges]}).all()
    return [(int(a), int(b)) for a, b in short]
