"""bench/store.py's batched brute force, the truth every recall figure of the benches is
measured against, checked against one query at a time by direct differences."""

import numpy as np
import pytest

from bench.store import exact_top_k


def one_at_a_time(mu: np.ndarray, q: np.ndarray, keep: np.ndarray, k: int) -> set[int]:
    rows = np.flatnonzero(keep)
    d = np.array([sum((float(a) - float(b)) ** 2 for a, b in zip(mu[i], q, strict=True))
                  for i in rows])
    return set(rows[np.argsort(d)[:k]].tolist())


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_the_batched_brute_force_finds_what_one_query_at_a_time_finds(chunk):
    rng = np.random.default_rng(5)
    mu = rng.normal(size=(301, 6)).astype(np.float32)
    mu[:50] += 40  # far rows with large norms: the expansion's rounding is largest there
    queries = np.vstack([rng.normal(size=(4, 6)), mu[:2] + 1e-3]).astype(np.float32)
    keep = rng.random(len(mu)) < 0.3
    everything = np.ones(len(mu), bool)
    for k in (1, 10):
        assert exact_top_k(mu, queries, k=k, chunk=chunk) == [
            one_at_a_time(mu, q, everything, k) for q in queries]
        assert exact_top_k(mu, queries, keep=keep, k=k, chunk=chunk) == [
            one_at_a_time(mu, q, keep, k) for q in queries]


def test_a_filter_that_keeps_fewer_than_k_rows_answers_those_rows():
    mu = np.arange(40, dtype=np.float32).reshape(20, 2)
    keep = np.zeros(20, bool)
    keep[[3, 11, 17]] = True
    assert exact_top_k(mu, mu[:2], keep=keep, chunk=6) == [{3, 11, 17}, {3, 11, 17}]
