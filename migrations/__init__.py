"""Alembic migrations (a package, so `latentbank migrate` finds them when installed)."""
