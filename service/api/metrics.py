"""Prometheus metrics of one API process (its own registry: apps in one process stay apart)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("latentbank.api")


class JobsCollector(Collector):
    """`latentbank_jobs{kind, status}`, read from the jobs table at scrape time."""

    def __init__(self, count: Callable[[], list[tuple[str, str, int]]]) -> None:
        self.count = count

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("latentbank_jobs", "jobs by kind and status",
                                   labels=["kind", "status"])
        try:
            for kind, status, n in self.count():
                family.add_metric([kind, status], n)
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("jobs metric unavailable: %s", type(exc).__name__)
        yield family


class ReplicasCollector(Collector):
    """`latentbank_db_replica_up` and `latentbank_db_replica_lag_seconds` per replica, and
    `latentbank_db_reads_total` by the server that answered (store/replicas.py)."""

    def __init__(self, reads: Any) -> None:
        self.reads = reads

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("latentbank_db_replica_up",
                               "1 when the replica answered its last check", labels=["replica"])
        lag = GaugeMetricFamily("latentbank_db_replica_lag_seconds",
                                "at most this far behind the primary, as last measured",
                                labels=["replica"])
        for state in self.reads.status():
            up.add_metric([state["replica"]], 1.0 if state["up"] else 0.0)
            if state["lag_s"] is not None:
                lag.add_metric([state["replica"]], state["lag_s"])
        served = CounterMetricFamily("latentbank_db_reads",
                                     "reads that may run behind, by the server that answered",
                                     labels=["server"])
        for server, n in self.reads.served.items():
            served.add_metric([server], n)
        yield from (up, lag, served)


class Metrics:
    def __init__(self, count_jobs: Callable[[], list[tuple[str, str, int]]],
                 reads: Any = None) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "latentbank_http_request_duration_seconds", "request latency by route",
            ["method", "route", "status"], registry=self.registry,
            buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        # Serving, per model and role (encoder/decoder): one series per served model.
        self.batch_rows = Histogram(
            "latentbank_decode_batch_rows", "rows per onnxruntime call",
            ["model", "role"], registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096))
        self.queue_seconds = Histogram(
            "latentbank_decode_queue_seconds",
            "time a request's rows waited in the model's queue before their call began",
            ["model", "role"], registry=self.registry,
            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))
        self.inference_seconds = Histogram(
            "latentbank_inference_seconds",
            "a request's time in the model's queue and onnxruntime call together",
            ["model", "role"], registry=self.registry,
            buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1, 5))
        self.submissions = Counter("latentbank_jobs_submitted", "jobs submitted", ["kind"],
                                   registry=self.registry)
        # authentication (service/api/auth.py): answers given before any body was read,
        # and key lookups that reached the database (the caches answer the rest)
        self.auth_refusals = Counter(
            "latentbank_auth_refusals", "requests refused before their body was read",
            ["reason"], registry=self.registry)
        self.key_lookups = Counter("latentbank_key_lookups",
                                   "API keys looked up in the database",
                                   registry=self.registry)
        self.registry.register(JobsCollector(count_jobs))
        if reads is not None:
            self.registry.register(ReplicasCollector(reads))

    def observer(self, model_id: int, role: str) -> ModelObserver:
        return ModelObserver(self, str(model_id), role)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelObserver:
    """One model's serving series, bound once (labels() per request costs a lookup)."""

    def __init__(self, metrics: Metrics, model: str, role: str) -> None:
        self.batch = metrics.batch_rows.labels(model, role).observe
        self.waited = metrics.queue_seconds.labels(model, role).observe
        self.served = metrics.inference_seconds.labels(model, role).observe


class RequestMetrics:
    """ASGI middleware: latency histogram by route template, and one log line a request."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(scope["method"], template,
                                        str(status["code"])).observe(seconds)
            log.info("request method=%s route=%s status=%d ms=%.1f", scope["method"], template,
                     status["code"], 1000 * seconds)
