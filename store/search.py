"""kNN search of an embedding set: the plan per query (exact, HNSW, or HNSW iterative under
a filter) and one statement for many queries; docs/internals/data-layer.md says why."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from sqlalchemy import text

from store.db import Database, binary_rows
from store.embedding_sets import BY_KEY, get_set, join_items
from store.errors import Conflict, InvalidInput, NotFound, TooLarge
from store.settings import Settings
from store.tables import EmbeddingSet
from store.vectors import check_half, indexed_sql, mu_sql, query_type, stored_sql

Metric = Literal["l2", "cosine"]
OPERATORS = {"l2": "<->", "cosine": "<=>"}
EF_MAX = 1000  # pgvector's ceiling for hnsw.ef_search
ITERATIVE_SCANS = (0, 8)  # the first pgvector with hnsw.iterative_scan


@dataclass
class Hit:
    index: int
    key: str
    label: str | None
    distance: float
    elbo: float
    log_px: float | None
    metadata: dict[str, Any] | None = None


@dataclass
class SearchFilter:
    label: str | list[str] | None = None
    metadata: dict[str, Any] | None = None
    elbo: tuple[float | None, float | None] | None = None
    log_px: tuple[float | None, float | None] | None = None

    def empty(self) -> bool:
        return (self.label is None and not self.metadata and self.elbo is None
                and self.log_px is None)


@dataclass
class SearchResult:
    hits: list[Hit]
    plan: str  # "exact", "hnsw(ef=N)", "hnsw-iterative(ef=N)" or "exact (after ...)"
    query: dict[str, Any] | None = None  # a key query's item: key, index, label


@dataclass(frozen=True)
class Plan:
    ef_search: int | None = None  # None: an exact scan
    iterative: bool = False  # a filtered HNSW scan that goes on until k rows pass

    def __str__(self) -> str:
        if self.ef_search is None:
            return "exact"
        return f"hnsw{'-iterative' if self.iterative else ''}(ef={self.ef_search})"


EXACT = Plan()


def vector_literal(values: Sequence[float] | np.ndarray) -> str:
    return "[" + ",".join(repr(float(v)) for v in values) + "]"


def _filter_sql(flt: SearchFilter | None, params: dict[str, Any]) -> str:
    return "".join(f" AND {c}" for c in _filter_clauses(flt, params))


def _filter_clauses(flt: SearchFilter | None, params: dict[str, Any]) -> list[str]:
    """The filter's conditions, on the item (`i.`) or on the latent row (`l.`)."""
    if flt is None:
        return []
    clauses = []
    if flt.label is not None:
        labels = [flt.label] if isinstance(flt.label, str) else list(flt.label)
        params["labels"] = [str(v) for v in labels]
        clauses.append("i.label = ANY(:labels)")
    if flt.metadata:
        params["meta"] = json.dumps(flt.metadata)
        clauses.append("i.metadata @> CAST(:meta AS jsonb)")
    for column, bounds in (("elbo", flt.elbo), ("log_px", flt.log_px)):
        if bounds is None:
            continue
        lo, hi = bounds
        if lo is not None:
            params[f"{column}_lo"] = float(lo)
            clauses.append(f"l.{column} >= :{column}_lo")
        if hi is not None:
            params[f"{column}_hi"] = float(hi)
            clauses.append(f"l.{column} <= :{column}_hi")
    return clauses


def _knn_sql(es: EmbeddingSet, metric: Metric, where: str, ef_search: int | None,
             query: str) -> str:
    """The set's k (`:k`) nearest rows to `query` (an SQL vector expression) that pass
    `where`, with their items: item_index, key, label, distance, elbo, log_px, metadata."""
    op = OPERATORS[metric]
    # The index matches only its expression (mu::vector(dim), or mu_half::halfvec(dim) for
    # a halfvec set); the plain column forces exact.
    target = indexed_sql(es) if ef_search else stored_sql(es)
    distance = f"{target} {op} {query}"
    # The set id is inlined (an integer from our own row): a generic plan of a prepared
    # statement could not prove a bound parameter matches the partial index's predicate.
    set_id = int(es.id)
    if "i." in where:  # item filters (label, metadata) need the join before the LIMIT
        return (f"SELECT l.item_index, i.key, i.label, {distance} AS distance, l.elbo, "
                f"l.log_px, i.metadata FROM latents l {join_items()} "
                f"WHERE l.set_id = {set_id}{where} ORDER BY {distance} LIMIT :k")
    # nearest first, then look up just those k items
    return (f"SELECT nn.item_index, i.key, i.label, nn.distance, nn.elbo, nn.log_px, "
            f"i.metadata FROM (SELECT l.item_index, l.dataset_id, l.dataset_index, "
            f"{distance} AS distance, l.elbo, l.log_px FROM latents l "
            f"WHERE l.set_id = {set_id}{where} ORDER BY {distance} LIMIT :k) nn "
            f"{join_items('nn')}")


def nearest_sql(es: EmbeddingSet, vectors: np.ndarray, k: int, metric: Metric,
                flt: SearchFilter | None, ef_search: int | None, iterative: bool = False,
                max_scan_tuples: int = 20_000) -> tuple[list[str], str, dict[str, Any]]:
    """(the transaction's settings, the statement, its parameters) of `nearest`."""
    params: dict[str, Any] = {"k": int(k), "qs": "{" + ",".join(
        f'"{vector_literal(v)}"' for v in vectors) + "}"}
    inner = _knn_sql(es, metric, _filter_sql(flt, params), ef_search, "q.v")
    # the queries arrive as the set's own type, cast once (not once a row scanned)
    sql = (f"SELECT q.n, nn.* FROM unnest(CAST(:qs AS {query_type(es)}[])) "
           f"WITH ORDINALITY AS q(v, n) "
           f"CROSS JOIN LATERAL ({inner}) nn ORDER BY q.n, nn.distance")
    setup = []
    if ef_search:
        setup.append(f"SET LOCAL hnsw.ef_search = {int(max(ef_search, k))}")
    if iterative:
        setup += ["SET LOCAL hnsw.iterative_scan = strict_order",
                  f"SET LOCAL hnsw.max_scan_tuples = {int(max_scan_tuples)}",
                  # The plan chose the index from its own estimate of the share that
                  # passes (_widened); PostgreSQL's estimate of a partition joined to
                  # `items` can be 1,000 times low, and it then hash-joins the whole set
                  # and sorts it (an exact scan under an index plan's name). Sorting off
                  # leaves it the index's order: the scan the plan meant.
                  "SET LOCAL enable_sort = off"]
    return setup, sql, params


def nearest(db: Database, es: EmbeddingSet, vectors: np.ndarray, k: int, metric: Metric,
            flt: SearchFilter | None, ef_search: int | None, iterative: bool = False,
            max_scan_tuples: int = 20_000) -> list[list[Hit]]:
    """The k nearest hits of each row of `vectors`, nearest first, by the given plan: one
    statement (a LATERAL join over the queries), one round trip."""
    setup, sql, params = nearest_sql(es, vectors, k, metric, flt, ef_search, iterative,
                                     max_scan_tuples)
    with db.engine.begin() as conn:
        for statement in setup:
            conn.execute(text(statement))
        rows = conn.execute(text(sql), params).all()
    hits: list[list[Hit]] = [[] for _ in range(len(vectors))]
    for r in rows:
        hits[int(r[0]) - 1].append(Hit(int(r[1]), r[2], r[3], float(r[4]), float(r[5]),
                                       None if r[6] is None else float(r[6]), r[7]))
    return hits


def plan_for(es: EmbeddingSet, settings: Settings, metric: Metric, k: int,
             flt: SearchFilter | None, exact: bool, pgvector: tuple[int, ...]) -> Plan:
    """How to answer one query (see docs/internals/data-layer.md, "Latents and retrieval")."""
    filtered = flt is not None and not flt.empty()
    if (exact or es.index_status != "ready" or es.hnsw_ef_search is None
            or metric != es.index_metric or es.n_items < settings.exact_search_below
            or k > 100 or (filtered and pgvector < ITERATIVE_SCANS)):
        return EXACT
    return Plan(max(es.hnsw_ef_search, 2 * k), filtered)


def search(db: Database, settings: Settings, set_id: int, *,
           vector: Sequence[float] | np.ndarray | None = None, key: str | None = None,
           k: int = 10, metric: Metric = "l2", flt: SearchFilter | None = None,
           exact: bool = False, include_query: bool = False) -> SearchResult:
    """k nearest neighbours of a vector, or of a stored item's `mu` given its key."""
    if (vector is None) == (key is None):
        raise InvalidInput("give exactly one of 'vector' and 'key'")
    return search_many(db, settings, set_id, [vector if key is None else key], k=k,
                       metric=metric, flt=flt, exact=exact, include_query=include_query)[0]


def _check_search(es: EmbeddingSet, settings: Settings, metric: str, k: int,
                  n_queries: int) -> None:
    if es.status != "ready" and es.status != "finishing":
        raise Conflict(f"embedding set {es.id} is {es.status}, not ready")
    if metric not in OPERATORS:
        raise InvalidInput(f"metric must be one of {', '.join(OPERATORS)}; got {metric!r}")
    if not 1 <= k <= 1000:
        raise InvalidInput(f"k must be between 1 and 1000; got {k}")
    if not 1 <= n_queries <= settings.search_max_queries:
        raise InvalidInput(f"give between 1 and {settings.search_max_queries} queries; got "
                           f"{n_queries}")


def _query_vectors(db: Database, es: EmbeddingSet,
                   queries: Sequence[Sequence[float] | np.ndarray | str], metric: Metric,
                   include_query: bool,
                   ) -> tuple[np.ndarray, list[int | None], list[dict[str, Any] | None]]:
    """Each query's vector (a key's: its item's `mu`), the item to leave out of its answer
    (a key's own item, unless `include_query`) and the key's item as answered."""
    keys = [q for q in queries if isinstance(q, str)]
    found = _items_by_key(db, es, keys) if keys else {}
    vectors = np.empty((len(queries), es.dim), np.float32)
    leave_out: list[int | None] = []
    items: list[dict[str, Any] | None] = []
    for n, query in enumerate(queries):
        if isinstance(query, str):
            vectors[n], index, label = found[query]
            leave_out.append(None if include_query else index)
            items.append({"key": query, "index": index, "label": label})
            continue
        items.append(None)
        q = np.asarray(query, dtype=np.float64)
        where = f"query {n}: " if len(queries) > 1 else ""
        if q.shape != (es.dim,):
            raise InvalidInput(f"{where}vector must have {es.dim} values; got {q.size}")
        if not np.isfinite(q).all():
            raise InvalidInput(f"{where}vector has non-finite values")
        if es.vector_type == "halfvec":  # compared as float16, as the set stores its own
            check_half(f"{where}vector", q, "cannot compare with")
            q = q.astype(np.float16).astype(np.float64)
        if metric == "cosine" and not np.any(q):
            raise InvalidInput(f"{where}the cosine distance is undefined for the zero vector")
        vectors[n] = q
        leave_out.append(None)
    return vectors, leave_out, items


def _widened(db: Database, es: EmbeddingSet, settings: Settings, plan: Plan,
             flt: SearchFilter | None) -> Plan:
    """A filtered HNSW plan with ef_search widened for the share of rows that pass."""
    if not (plan.iterative and plan.ef_search is not None):
        return plan
    # To find ef_search rows that pass, the scan visits about ef_search / share rows;
    # past max_scan_tuples it would give up and the query run exactly anyway.
    share = _matching_rows(db, es, flt) / max(1, es.n_items)
    if plan.ef_search > share * settings.hnsw_max_scan_tuples:
        return EXACT
    # The calibrated ef_search buys its recall for ef_search candidates that all
    # count; under a filter only a share of them pass, so the candidate list is
    # widened by 1 / share (pgvector's ceiling is 1000) to keep that recall.
    return Plan(min(EF_MAX, max(plan.ef_search, math.ceil(plan.ef_search / share))), True)


def search_many(db: Database, settings: Settings, set_id: int,
                queries: Sequence[Sequence[float] | np.ndarray | str], *, k: int = 10,
                metric: Metric = "l2", flt: SearchFilter | None = None, exact: bool = False,
                include_query: bool = False) -> list[SearchResult]:
    """k nearest neighbours of each query (a vector, or a stored item's key: then the item
    itself is left out unless `include_query`), in one database round trip (plus one to
    look the keys up, and one exact retry for any filtered answer the index left short)."""
    es = get_set(db, set_id)
    _check_search(es, settings, metric, k, len(queries))
    vectors, leave_out, items = _query_vectors(db, es, queries, metric, include_query)
    # a key's own item comes back first (distance 0): ask for one more, drop it below
    asked = k + (1 if any(i is not None for i in leave_out) else 0)
    plan = _widened(db, es, settings,
                    plan_for(es, settings, metric, asked, flt, exact, db.pgvector()), flt)
    if plan.ef_search is None and len(queries) * es.n_items > settings.search_max_exact_scan:
        raise TooLarge(f"{len(queries)} queries x {es.n_items} items is "
                       f"{len(queries) * es.n_items} distances by exact scan ({plan}: small "
                       "set, k > 100, 'exact', no index yet or a filter the index cannot "
                       f"serve); one search computes at most {settings.search_max_exact_scan} "
                       "(LATENTBANK_SEARCH_MAX_EXACT_SCAN): send fewer queries per request")
    hits = nearest(db, es, vectors, asked, metric, flt, plan.ef_search, plan.iterative,
                   settings.hnsw_max_scan_tuples)
    said = [str(plan)] * len(queries)
    short = [n for n, h in enumerate(hits) if plan.iterative and len(h) < asked]
    if short:  # never short because of the index: those queries again, exactly
        again = nearest(db, es, vectors[short], asked, metric, flt, None)
        for n, h in zip(short, again, strict=True):
            said[n] = f"exact (after {plan} found {len(hits[n])} of {asked})"
            hits[n] = h
    return [SearchResult([h for h in found_hits if h.index != skip][:k], plan_said, item)
            for found_hits, skip, plan_said, item in zip(hits, leave_out, said, items,
                                                         strict=True)]


def _estimated_rows(conn: Any, sql: str, params: dict[str, Any]) -> float:
    plan = conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}"), params).scalar()
    return float(plan[0]["Plan"]["Plan Rows"])


def _matching_rows(db: Database, es: EmbeddingSet, flt: SearchFilter | None) -> float:
    """The planner's estimate of the set's rows that pass the filter (EXPLAINs: no scan):
    the set's rows that pass its conditions on latents, times the share of the set's
    items that pass its conditions on items. Each table is estimated on its own: their
    statistics are good, but the planner's estimate of the join between a set's partition
    and `items` is not (it put a label filter that 10 % of 1M items pass at 0.01 %, and
    the search then scanned exactly, 40 times slower)."""
    params: dict[str, Any] = {}
    clauses = _filter_clauses(flt, params)
    on_latents = "".join(f" AND {c}" for c in clauses if c.startswith("l."))
    on_items = "".join(f" AND {c}" for c in clauses if c.startswith("i."))
    with db.engine.connect() as conn:
        rows = _estimated_rows(conn, f"SELECT 1 FROM latents l WHERE l.set_id = {int(es.id)}"
                                     f"{on_latents}", params)
        if on_items:
            params["datasets"] = list(conn.execute(text(
                "SELECT dataset_id FROM embedding_set_parts WHERE set_id = :s"),
                {"s": es.id}).scalars())
            items = "SELECT 1 FROM items i WHERE i.dataset_id = ANY(:datasets)"
            rows *= (_estimated_rows(conn, items + on_items, params)
                     / max(1.0, _estimated_rows(conn, items, params)))
    return rows


def _items_by_key(db: Database, es: EmbeddingSet, keys: list[str],
                  ) -> dict[str, tuple[np.ndarray, int, str | None]]:
    """`mu`, index and label of each key's item (NotFound naming the first missing keys)."""
    with db.engine.connect() as conn:
        rows = binary_rows(conn, f"SELECT i.key, {mu_sql(es)}, l.item_index, i.label FROM {BY_KEY} "
                           "AND i.key = ANY(%(keys)s)", {"s": es.id, "keys": sorted(set(keys))})
    found = {r[0]: (r[1].to_numpy(), int(r[2]), r[3]) for r in rows}
    missing = [key for key in dict.fromkeys(keys) if key not in found]
    if missing:
        named = ", ".join(repr(key) for key in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise NotFound(f"embedding set {es.id} has no item with key {named}{more}")
    return found
