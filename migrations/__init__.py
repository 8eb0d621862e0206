"""Alembic migrations: every schema change is a revision in `versions/`.

`migrate(url)` checks that the database answers and offers pgvector, then upgrades it
(idempotent); `latentbank migrate` and `latentbank up` call it.
"""

from __future__ import annotations

import os
import re
from typing import Any

from store.db import check_database, make_engine, sqlalchemy_url


def include_object(obj: Any, name: str | None, type_: str, reflected: bool,
                   compare_to: Any) -> bool:
    """What autogenerate and drift checks compare: not the per-set HNSW indexes
    (store.indexes) nor the per-set partitions of `latents` (store.partitions), data made
    with each set rather than schema."""
    if name is None:
        return True
    if type_ == "index" and name.startswith("latents_mu_hnsw_"):
        return False
    return not (type_ == "table" and re.fullmatch(r"latents_set_[0-9]+", name))


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", os.path.dirname(__file__))
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Check the database, then upgrade it to `revision` (idempotent)."""
    from alembic import command

    engine = make_engine(url)
    try:
        check_database(engine)
    finally:
        engine.dispose()
    command.upgrade(alembic_config(url), revision)


