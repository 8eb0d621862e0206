"""Reading a set's stored items back: one by key, the least likely, a spread sample, the
whole set page by page, and the set's summary figures."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from sqlalchemy import text

from store.db import Database, binary_rows
from store.embedding_sets import BY_KEY, get_set, join_items
from store.errors import NotFound
from store.search import Hit
from store.vectors import logvar_sql, mu_sql


def get_item(db: Database, set_id: int, key: str) -> dict[str, Any]:
    """One stored item of a set by its external key: codes, ELBO terms, label, metadata."""
    es = get_set(db, set_id)  # NotFound for an unknown set
    with db.engine.connect() as conn:
        rows = binary_rows(
            conn, f"SELECT l.item_index, i.key, i.label, i.metadata, {mu_sql(es)}, "
            f"{logvar_sql(es)}, l.elbo, l.reconstruction, l.kl, l.log_px, l.log_px_se, "
            f"l.ess FROM {BY_KEY} "
            "AND i.key = %(key)s", {"s": set_id, "key": key})
    row = rows[0] if rows else None
    if row is None:
        raise NotFound(f"embedding set {set_id} has no item with key {key!r}")
    return {"index": int(row[0]), "key": row[1], "label": row[2], "metadata": row[3],
            "mu": row[4].to_numpy(), "logvar": row[5].to_numpy(), "elbo": row[6],
            "reconstruction": row[7], "kl": row[8], "log_px": row[9], "log_px_se": row[10],
            "ess": row[11]}


def outliers(db: Database, set_id: int, k: int = 10) -> list[Hit]:
    """The k items of lowest log p(x) (lowest ELBO when the set has no log p(x))."""
    es = get_set(db, set_id)
    column = "log_px" if es.importance_samples > 0 else "elbo"
    with db.engine.connect() as conn:
        rows = conn.execute(text(
            f"SELECT l.item_index, i.key, i.label, l.elbo, l.log_px, i.metadata FROM latents l "
            f"{join_items()} "
            f"WHERE l.set_id = :s ORDER BY l.{column} ASC, l.item_index LIMIT :k"),
            {"s": set_id, "k": int(k)}).all()
    return [Hit(int(r[0]), r[1], r[2], float("nan"), float(r[3]),
                None if r[4] is None else float(r[4]), r[5]) for r in rows]


def export_pages(db: Database, set_id: int, page_rows: int = 10_000,
                 ) -> Iterator[list[dict[str, Any]]]:
    """The whole set in item order, one page at a time (keyset pagination, bounded memory)."""
    es = get_set(db, set_id)  # NotFound for an unknown set
    after = -1
    while True:
        with db.engine.connect() as conn:
            rows = binary_rows(
                conn, f"SELECT l.item_index, i.key, i.label, {mu_sql(es)}, {logvar_sql(es)}, "
                "l.elbo, "
                f"l.reconstruction, l.kl, l.log_px, l.log_px_se, l.ess FROM latents l "
                f"{join_items()} "
                "WHERE l.set_id = %(s)s AND l.item_index > %(after)s "
                "ORDER BY l.item_index LIMIT %(n)s",
                {"s": set_id, "after": after, "n": page_rows})
        if not rows:
            return
        yield [{"index": int(r[0]), "key": r[1], "label": r[2],
                "mu": r[3].to_list(), "logvar": r[4].to_list(),
                "elbo": r[5], "reconstruction": r[6], "kl": r[7], "log_px": r[8],
                "log_px_se": r[9], "ess": r[10]} for r in rows]
        after = int(rows[-1][0])


def sample_items(db: Database, set_id: int, n: int) -> list[dict[str, Any]]:
    """About `n` items spread evenly over the set (every ceil(N / n)-th position), in item
    order, with their codes and figures: what a scatter of the set draws."""
    es = get_set(db, set_id)
    step = max(1, math.ceil(es.n_items / max(1, n)))
    with db.engine.connect() as conn:
        rows = binary_rows(
            conn, f"SELECT l.item_index, i.key, i.label, {mu_sql(es)}, l.elbo, l.log_px "
            "FROM latents l "
            f"{join_items()} WHERE l.set_id = %(s)s AND l.item_index %% %(step)s = 0 "
            "ORDER BY l.item_index LIMIT %(n)s", {"s": set_id, "step": step, "n": int(n)})
    return [{"index": int(r[0]), "key": r[1], "label": r[2], "mu": r[3].to_numpy(),
             "elbo": r[4], "log_px": r[5]} for r in rows]


def labelled_sample(db: Database, dataset_id: int, n: int, salt: str) -> list[tuple[str, str]]:
    """Up to `n` (key, label) pairs of a dataset's labelled items: a pseudo-random sample,
    the same for the same `salt`."""
    with db.engine.connect() as conn:
        return [(r[0], r[1]) for r in conn.execute(text(
            "SELECT key, label FROM items WHERE dataset_id = :d AND label IS NOT NULL "
            "ORDER BY md5(key || :salt) LIMIT :n"), {"d": dataset_id, "salt": salt, "n": n})]


def set_statistics(db: Database, set_id: int) -> dict[str, Any]:
    """The set's row count, the means of its per-item figures (nats per item), the
    Monte-Carlo standard error of the mean log p(x) (sqrt(sum se^2) / n: the items' draws
    are independent) and the mean and smallest ESS of the importance weights."""
    with db.engine.connect() as conn:
        row = conn.execute(text("SELECT count(*), avg(elbo), avg(reconstruction), avg(kl), "
                                "avg(log_px), sqrt(sum(log_px_se ^ 2)) / count(log_px_se), "
                                "avg(ess), min(ess) FROM latents WHERE set_id = :s"),
                           {"s": set_id}).one()
    mean = [None if v is None else float(v) for v in row[1:]]
    return {"n_items": int(row[0]), "mean_elbo": mean[0], "mean_reconstruction": mean[1],
            "mean_kl": mean[2], "mean_log_px": mean[3], "mean_log_px_se": mean[4],
            "ess_mean": mean[5], "ess_min": mean[6]}
