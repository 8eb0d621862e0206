"""One error hierarchy for the data layer; the API maps each class to an HTTP status."""

from __future__ import annotations


class StoreError(Exception):
    """Base class. `code` is a stable machine-readable name for clients."""

    code = "store_error"


class InvalidInput(StoreError, ValueError):
    """The request or uploaded data is malformed (HTTP 422)."""

    code = "invalid_input"


class DatasetError(InvalidInput):
    """A dataset file cannot be ingested: format, dtype, shape, values, keys or size."""

    code = "invalid_dataset"


class UnsupportedFormat(DatasetError):
    """The file's format is not one we ingest (HTTP 415)."""

    code = "unsupported_format"


class TooLarge(DatasetError):
    """The data exceeds a configured size limit (HTTP 413)."""

    code = "too_large"


class IdempotencyMismatch(InvalidInput):
    """An Idempotency-Key reused with a different request (HTTP 422)."""

    code = "idempotency_key_reused"


class NotFound(StoreError, LookupError):
    code = "not_found"


class Conflict(StoreError):
    """The request clashes with stored state (HTTP 409)."""

    code = "conflict"


class PathNotAllowed(InvalidInput):
    """A path or artifact key points outside the configured roots."""

    code = "path_not_allowed"


class DatabaseUnavailable(StoreError):
    """The database cannot be reached or lacks something the service needs (HTTP 503)."""

    code = "database_unavailable"


class PgvectorMissing(DatabaseUnavailable):
    code = "pgvector_missing"


class DatabaseOutage(DatabaseUnavailable):
    """The connection failed, was lost, or none came free in time: a retry may outlive it
    (HTTP 503 with Retry-After)."""


class StatementTimeout(DatabaseUnavailable):
    """The server cancelled a statement that ran past LATENTBANK_DB_STATEMENT_TIMEOUT_MS
    (HTTP 503 with Retry-After)."""

    code = "statement_timeout"
