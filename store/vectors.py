"""How a set's latents are stored, as SQL: `vector` sets keep float32 `mu` and `logvar`,
`halfvec` sets float16 `mu_half` and `logvar_half` (half the bytes a dimension; a value
keeps about three significant digits, and |x| <= 65504). Every read answers float32
either way; searches and the HNSW index compare values as stored, so exact and indexed
answers of one set agree."""

from __future__ import annotations

from typing import Any

import numpy as np

from store.errors import InvalidInput

HALF_MAX = 65504.0  # the largest finite float16


def mu_sql(es: Any, alias: str = "l") -> str:
    """The set's posterior means as float32 `vector` values."""
    return f"{alias}.mu" if es.vector_type == "vector" else f"{alias}.mu_half::vector"


def logvar_sql(es: Any, alias: str = "l") -> str:
    """The set's log-variances as float32 `vector` values."""
    return f"{alias}.logvar" if es.vector_type == "vector" else f"{alias}.logvar_half::vector"


def indexed_sql(es: Any, alias: str = "l") -> str:
    """The expression the set's HNSW index is built on (alias "": as CREATE INDEX names
    it), and searches order by: the stored values at the set's dimension (an index needs
    a typed dimension)."""
    prefix = f"{alias}." if alias else ""
    if es.vector_type == "vector":
        return f"{prefix}mu::vector({int(es.dim)})"
    return f"{prefix}mu_half::halfvec({int(es.dim)})"


def stored_sql(es: Any, alias: str = "l") -> str:
    """The stored column itself (exact search: no index matches it)."""
    return f"{alias}.mu" if es.vector_type == "vector" else f"{alias}.mu_half"


def query_type(es: Any) -> str:
    """The type the set's query vectors are cast to once, before the scan: its own."""
    return str(es.vector_type)


def opclass(es: Any, metric: str) -> str:
    return f"{es.vector_type}_{'l2' if metric == 'l2' else 'cosine'}_ops"


def vector_columns(vector_type: str) -> tuple[str, str]:
    """The two columns a COPY of the set's rows writes its vectors into."""
    return ("mu", "logvar") if vector_type == "vector" else ("mu_half", "logvar_half")


def check_half(name: str, values: np.ndarray, what: str = "cannot store; use vector_type "
               "'vector' for this model") -> None:
    """Refuse values a float16 cannot hold (they would become infinities)."""
    if values.size and float(np.abs(values).max()) > HALF_MAX:
        raise InvalidInput(f"{name} has values beyond ±{HALF_MAX:g}, which a halfvec set "
                           f"{what}")
