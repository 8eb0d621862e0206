"""The broker seen from the API and the CLI: a publisher of job tasks, and a liveness probe.

Tasks are published by name through `store.publishing.publish` (see
`store.publishing.TASKS`), so neither imports the worker's task code.
"""

from __future__ import annotations

from typing import Any


def broker_ping(url: str, timeout: float = 2.0) -> None:
    """PING the broker once; raises unless it answers within `timeout` seconds. No
    retries: redis-py's default retries with back-off turned a 2 s timeout into ~26 s
    against a stopped (SIGSTOP) server."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                               "retry": Retry(NoBackoff(), 0), "retry_on_timeout": False}
    if url.startswith("redis+socket://"):
        client = redis.Redis(unix_socket_path=url[len("redis+socket://"):], **options)
    else:
        client = redis.Redis.from_url(url, **options)
    try:
        client.ping()
    finally:
        client.close()


def task_sender(broker_url: str, visibility_timeout: int) -> Any:
    """A Celery app that only publishes (it imports no task code): it fails fast when the
    broker is down, so a submission answers at once and its job is published later."""
    from celery import Celery

    app = Celery("latentbank-publisher", set_as_current=False)
    transport = {"visibility_timeout": visibility_timeout, "max_retries": 0,
                 "socket_connect_timeout": 2, "socket_timeout": 2}
    app.conf.update(broker_url=broker_url, task_serializer="json", accept_content=["json"],
                    broker_transport_options=transport, broker_connection_retry=False,
                    broker_connection_max_retries=0, broker_connection_timeout=2)
    return app
