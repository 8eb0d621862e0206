"""Alembic environment: online migrations against LATENTBANK_DATABASE_URL or the URL given."""

from __future__ import annotations

import pgvector.sqlalchemy  # noqa: F401  (registers the vector type for autogenerate)
from alembic import context
from sqlalchemy import engine_from_config, pool

from migrations import include_object
from store.tables import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from store.db import database_url
        from store.settings import get_settings

        url = database_url(get_settings())
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    connectable = engine_from_config(config.get_section(config.config_ini_section, {}),
                                     prefix="sqlalchemy.", poolclass=pool.NullPool)
    with connectable.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata,
                          include_object=include_object, compare_type=True)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run them online")
run_migrations_online()
