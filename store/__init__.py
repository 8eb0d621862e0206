"""The shared data layer: settings, PostgreSQL tables and queries, the artifact store.

Used by both the API (`service/`) and the workers (`workers/`); imports neither torch
nor Celery, so the API image stays small.
"""
