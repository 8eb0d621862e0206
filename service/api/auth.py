"""Authentication before the body: an ASGI layer that checks the API key of a request from
its headers alone, before anything receives, reads or parses its body
(docs/internals/serving.md, docs/operations/security.md)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service.api.deps import Services, in_thread
from service.api.limits import Buckets, Slots
from store.db import is_unavailable
from store.keys import SCOPES, hash_key, implied_scopes, live_key, verify_hash, well_formed

log = logging.getLogger("latentbank.api")

# GET /v1/jobs/{job_id}/events: counted against max_streams_per_key, not the request cap
STREAM = re.compile(r"/v1/jobs/[^/]+/events/?")
BEARER = "missing API key: send 'Authorization: Bearer <key>'"
UNKNOWN = "unknown or revoked API key"


@dataclass(frozen=True)
class Refusal:
    status: int
    code: str
    message: str
    reason: str  # the label of latentbank_auth_refusals
    headers: tuple[tuple[str, str], ...] = ()


def is_loopback(host: str | None) -> bool:
    """Whether `host` (the client's address as the server saw it) is 127.0.0.0/8 or ::1
    (an IPv4-mapped IPv6 address counts as its IPv4 one)."""
    if not host:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def client_address(scope: dict[str, Any]) -> str:
    """The name failed authentications are counted under: the client's address, an IPv6
    client by its /64 (one host is commonly given a whole /64)."""
    client = scope.get("client")
    if not client:
        return "unknown"
    try:
        ip = ipaddress.ip_address(client[0])
    except ValueError:
        return str(client[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def metrics_open(access: str, scope: dict[str, Any]) -> bool:
    """Whether /metrics answers this request without a key (`metrics_access`). A request
    that names a proxy (Forwarded, X-Forwarded-For) is not a loopback client: a proxy on
    the same host would otherwise open /metrics to everyone it serves."""
    if access == "open":
        return True
    if access != "loopback":
        return False
    client = scope.get("client")
    if not client or not is_loopback(client[0]):
        return False
    return not any(name in (b"forwarded", b"x-forwarded-for", b"x-real-ip")
                   for name, _ in scope.get("headers", ()))


def _bearer(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            token = token.strip()
            return token if scheme.lower() == "bearer" and token else None
    return None


def _has_body(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
            return True
    return False


def scope_table(routes: Sequence[Any]) -> list[tuple[frozenset[str], re.Pattern[str], str]]:
    """(methods, path pattern, scope) of every route whose `require` asks more than read."""
    try:  # FastAPI >= 0.160 keeps included routers whole: this walks what they hold
        from fastapi.routing import iter_route_contexts
    except ImportError:
        flat: Any = routes
    else:
        flat = iter_route_contexts(routes)
    table = []
    for route in flat:  # `require` in the route's dependencies, or as a parameter's
        calls = [d.dependency for d in getattr(route, "dependencies", None) or ()]
        calls += [d.call for d in getattr(getattr(route, "dependant", None), "dependencies",
                                          ())]
        for call in calls:
            needed = getattr(call, "required_scope", None)
            if needed and needed != "read":
                table.append((frozenset(route.methods or ()), route.path_regex, needed))
    return table


_GROUP_NAME = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


def scope_patterns(table: Sequence[tuple[frozenset[str], re.Pattern[str], str]],
                   ) -> dict[str, list[tuple[re.Pattern[str], str]]]:
    """By method, the table as one pattern per scope, highest first: a request's scope is
    one C-level match a scope instead of a Python loop over every route's pattern (the
    loop cost the decode hot path about 30 us a request). Route patterns name their
    groups (`(?P<model_id>...)`), which may repeat across routes: unnamed here."""
    by_method: dict[str, dict[str, list[str]]] = {}
    for methods, pattern, scope_name in table:
        if scope_name not in SCOPES:  # a misspelt `require` must not pass as read
            raise ValueError(f"a route requires the unknown scope {scope_name!r}")
        for method in methods:
            by_method.setdefault(method, {}).setdefault(scope_name, []).append(
                _GROUP_NAME.sub("(?:", pattern.pattern))
    return {method: [(re.compile("|".join(f"(?:{p})" for p in sources[name])), name)
                     for name in reversed(SCOPES) if name in sources]
            for method, sources in by_method.items()}


async def lookup(svc: Services, digest: str) -> tuple[int, set[str]] | None:
    """The key (id, scopes) whose secret hashes to `digest`, from the database, caching
    the answer either way. Requests that ask while the key's lookup runs wait for that
    one: 64 requests of a new key at once cost one query. The lookup runs as a task of its
    own, so a waiter cancelled (its client gone) leaves it running for the others."""
    running = joinable(svc, digest)
    if running is None:
        running = asyncio.ensure_future(_lookup(svc, digest))
        svc.lookups[digest] = running
        running.add_done_callback(lambda task: _lookup_done(svc, digest, task))
    return await asyncio.shield(running)


def joinable(svc: Services, digest: str) -> asyncio.Task | None:
    """The lookup of `digest` running on this event loop, if there is one."""
    running = svc.lookups.get(digest)
    if running is None or running.get_loop() is not asyncio.get_running_loop():
        return None
    return running


def _lookup_done(svc: Services, digest: str, task: asyncio.Task) -> None:
    if svc.lookups.get(digest) is task:
        del svc.lookups[digest]


async def _lookup(svc: Services, digest: str) -> tuple[int, set[str]] | None:
    svc.metrics.key_lookups.inc()
    # the primary; while it is down, a replica within the lag bound (it knows every key
    # made and revoked until shortly before): its None is not cached, the key may be newer
    row, server = await in_thread(svc.reads.fresh, verify_hash, live_key, digest)
    if svc.unknown_keys.get(digest) is not None:
        return None  # revoked through this process while the query ran: not put back
    if server == "replica":
        if row is None:
            return None
        known = (row.id, implied_scopes(list(row.scopes)))
        svc.keys.put(digest, known)
        return known
    if row is None:
        svc.keys.pop(digest)
        svc.good_keys.pop(digest)
        # always right: a key never becomes valid later (its secret is random, first shown
        # when the key is made)
        svc.unknown_keys.put(digest, True)
        return None
    known = (row.id, implied_scopes(list(row.scopes)))
    svc.keys.put(digest, known)
    svc.good_keys.put(digest, True)
    return known


async def key_alive(svc: Services, digest: str) -> bool:
    """Whether the key is still live: from the verified-key cache while it holds it (10 s;
    a key revoked through this API leaves it at once), else from the database."""
    if svc.keys.get(digest) is not None:
        return True
    if svc.unknown_keys.get(digest) is not None:
        return False
    return await lookup(svc, digest) is not None


def forget_key(svc: Services, digest: str) -> None:
    """A key revoked through this process: refused from now on, without a lookup."""
    svc.keys.pop(digest)
    svc.good_keys.pop(digest)
    svc.unknown_keys.put(digest, True)


class Authenticate:
    """The outermost middleware (docs/internals/serving.md: authentication before the
    body)."""

    def __init__(self, app: Any, services: Services, routes: Sequence[Any]) -> None:
        self.app, self.svc = app, services
        settings = services.settings
        self.failures = Buckets(settings.auth_failures_per_second, settings.auth_failures_burst)
        self.rate = (Buckets(settings.rate_limit_per_second, settings.rate_limit_burst)
                     if settings.rate_limit_per_second > 0 else None)
        self.active = Slots(settings.max_concurrent_per_key)
        self.streams = Slots(settings.max_streams_per_key)
        # built with the middleware stack, once every route is in: a bad one fails there
        self._scopes = scope_patterns(scope_table(routes))
        self.refused = services.metrics.auth_refusals

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if not (path.startswith("/v1/") or path == "/v1" or (
                path == "/metrics"
                and not metrics_open(self.svc.settings.metrics_access, scope))):
            await self.app(scope, receive, send)
            return
        verified = await self._verify(scope)
        if isinstance(verified, Refusal):
            await self._refuse(scope, send, verified)
            return
        (key_id, scopes), digest = verified
        refusal, slots = self._admit(scope, key_id, scopes)
        if refusal is not None:
            await self._refuse(scope, send, refusal)
            return
        state = scope.setdefault("state", {})
        state["key_id"], state["scopes"], state["key_hash"] = key_id, scopes, digest
        try:
            await self.app(scope, receive, send)
        finally:
            slots.release(key_id)

    async def _verify(self, scope: dict[str, Any],
                      ) -> tuple[tuple[int, set[str]], str] | Refusal:
        token = _bearer(scope["headers"])
        if token is None:
            return Refusal(401, "unauthorized", BEARER, "missing",
                           (("WWW-Authenticate", "Bearer"),))
        svc = self.svc
        shaped = well_formed(token)
        digest = hash_key(token) if shaped else ""
        known = svc.keys.get(digest) if shaped else None
        if known is not None:
            return known, digest
        address = client_address(scope)
        # A check that may fail takes its address's token BEFORE the lookup (given back when
        # the key is found): requests in flight at once cannot all pass a limit that is
        # only counted after their lookups. Keys verified lately pass without one. A
        # request whose key is being looked up already waits for that lookup and takes no
        # token (it costs no second lookup), but is still refused while the bucket is empty.
        guarded = not shaped or svc.good_keys.get(digest) is None
        took = guarded and joinable(svc, digest) is None
        if guarded:
            wait = self.failures.take(address) if took else self.failures.wait(address)
            if wait > 0:
                return Refusal(429, "too_many_requests",
                               "too many failed authentications from this address; retry "
                               "later (auth_failures_per_second)", "failures",
                               (("Retry-After", str(math.ceil(wait))),))
        if not shaped or svc.unknown_keys.get(digest) is not None:
            return Refusal(401, "unauthorized", UNKNOWN, "unknown",
                           (("WWW-Authenticate", "Bearer"),))
        try:
            known = await lookup(svc, digest)
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            if took:
                self.failures.give(address)
            log.warning("database unavailable for a key lookup: %s", type(exc).__name__)
            return Refusal(503, "database_unavailable",
                           "the database is unavailable; try again shortly", "unavailable",
                           (("Retry-After", "5"),))
        if known is None:
            return Refusal(401, "unauthorized", UNKNOWN, "unknown",
                           (("WWW-Authenticate", "Bearer"),))
        if took:
            self.failures.give(address)
        return known, digest

    def _admit(self, scope: dict[str, Any], key_id: int, scopes: set[str],
               ) -> tuple[Refusal | None, Slots]:
        """The scope, the key's rate and its slots; the slot is held when admitted."""
        needed = "read" if "admin" in scopes else self._required(scope)
        if needed not in scopes:
            return Refusal(403, "forbidden", f"this API key lacks the '{needed}' scope",
                           "forbidden"), self.active
        if self.rate is not None:
            wait = self.rate.take(key_id)
            if wait > 0:
                return Refusal(429, "too_many_requests",
                               f"this API key is over its rate of "
                               f"{self.rate.rate:g} requests a second "
                               "(rate_limit_per_second)", "rate",
                               (("Retry-After", str(math.ceil(wait))),)), self.active
        stream = scope["method"] == "GET" and STREAM.fullmatch(scope["path"]) is not None
        slots = self.streams if stream else self.active
        if not slots.acquire(key_id):
            what, setting = (("event streams open", "max_streams_per_key") if stream
                             else ("requests in progress", "max_concurrent_per_key"))
            return Refusal(429, "too_many_requests",
                           f"this API key already has {slots.limit} {what} "
                           f"({setting}); retry when one ends", "streams" if stream
                           else "concurrent", (("Retry-After", "1"),)), slots
        return None, slots

    def _required(self, scope: dict[str, Any]) -> str:
        """The scope the matched route's `require` names (read when none asks more)."""
        path = scope["path"]
        for pattern, scope_name in self._scopes.get(scope["method"], ()):
            if pattern.match(path):
                return scope_name
        return "read"

    async def _refuse(self, scope: dict[str, Any], send: Any, refusal: Refusal) -> None:
        """The error, sent without receiving anything: the body stays unread, and a
        connection that was about to carry one is closed after the answer."""
        self.refused.labels(refusal.reason).inc()
        body = json.dumps({"error": {"code": refusal.code, "message": refusal.message}}
                          ).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers]
        if _has_body(scope["headers"]):
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": refusal.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body})
