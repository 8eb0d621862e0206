"""The data layer the API and the workers share: settings, PostgreSQL tables and queries,
the artifact store; it imports neither torch nor Celery, so the API image stays small."""
