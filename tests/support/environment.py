"""Settings from an environment, and the machine's own PostgreSQL when one answers."""

from sqlalchemy import create_engine


def settings_of(env, **overrides):
    from store.settings import Settings

    values = {k[len("LATENTBANK_"):].lower(): v for k, v in env.items()}
    return Settings(**{**values, **overrides})


SYSTEM_PG = "postgresql+psycopg://postgres:secret-password@127.0.0.1:5432/postgres"


def system_pg_up():
    engine = create_engine(SYSTEM_PG, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except Exception:
        return False
    finally:
        engine.dispose()
