"""Authentication before the body (service/api/auth.py), attacked from outside: the API in
its own process (`hostile_api`, production defaults) for what costs memory or time, an
app in this process where a test needs small limits or counts the SQL the app sends.

Flood tests send from their own loopback address (127.0.0.x): the failed-authentication
bucket is per address, and each test keeps its own."""

import asyncio
import datetime as dt
import json
import re
import secrets
import socket
import threading
import time

import httpx
import pytest
from sqlalchemy import event

from service.api.auth import client_address, is_loopback, metrics_open
from service.api.limits import Buckets, Slots
from tests.support import Probe, Served, settings_of

MiB = 1 << 20
HEALTH_BOUND = 0.5  # seconds: the goal is 0.1; the machine is shared and loaded
UI_POLICY = ("default-src 'self'; img-src 'self' blob: data:; "
             "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'")


def bogus_key():
    """A key of the right shape (lb_ + 43 url-safe characters) that no one made."""
    return "lb_" + secrets.token_urlsafe(32)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def from_address(address, **kwargs):
    """A client whose requests come from `address` (any of 127.0.0.0/8 is this host)."""
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), **kwargs)


def read_answer(sock):
    """(status, headers, body) of one HTTP/1.1 answer read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def request_head(method, path, port, headers=(), length=None):
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def asgi_call(app, method, path, client, headers, receive):
    """The first message (status and headers) `app` sends for one request made in this
    process, from `client` (an address)."""
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "client": (client, 5000),
             "server": ("127.0.0.1", 80), "headers": headers}
    await app(scope, receive, send)
    return sent[0]


def lookups(url):
    """latentbank_key_lookups_total of the API at `url` (its /metrics, open on loopback)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.search(r"^latentbank_key_lookups_total (\S+)$", text, re.M)
    return float(found[1])


@pytest.fixture
def fresh_key(api_db):
    """A key of its own (its limits are its own), revoked after the test."""
    from store.keys import create_key, revoke_key

    made = []

    def make(scope="read"):
        key = create_key(api_db, f"hostile-auth-{scope}-{len(made)}", [scope])
        made.append(key)
        return key

    yield make
    for key in made:
        revoke_key(api_db, key.id)


@pytest.fixture
def running_job(api_db):
    """A job that stays running (a lease an hour long, no worker behind it): its event
    stream stays open until the test ends it."""
    from store.tables import Job

    with api_db.session() as s:
        job = Job(kind="train", status="running", params={}, lease_owner="hostile-auth-test",
                  lease_expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
        s.add(job)
        s.flush()
        job_id = job.id
    yield job_id
    with api_db.session() as s:
        row = s.get(Job, job_id)
        row.status, row.lease_owner, row.error = "failed", None, "test job"
        row.finished_at = dt.datetime.now(dt.UTC)


def closed(sock):
    """The server closed the connection: an orderly end, or a reset (a socket closed with
    the client's bytes still unread makes the kernel send RST instead of FIN)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --- a body without a valid key is never read ---------------------------------------------

def test_a_16_mib_body_without_a_key_is_answered_401_before_it_is_sent(hostile_api):
    """The client sends the head and the first 64 KiB of a 16 MiB body, then waits: the
    401 must come now (the code before this change read the whole body, then answered),
    and the connection is closed after it."""
    size, first = 16 * MiB, b"{" + b" " * (64 * 1024 - 1)
    head = request_head("POST", "/v1/training-jobs", hostile_api.port,
                        ["Content-Type: application/json"], size)
    with Probe(hostile_api) as probe, \
            socket.create_connection(("127.0.0.1", hostile_api.port), timeout=3) as sock:
        started = time.perf_counter()
        sock.sendall(head + first)
        status, headers, body = read_answer(sock)
        took = time.perf_counter() - started
        assert closed(sock)  # the rest of the body is never taken
    print(f"16 MiB body, no key: {status} after {took * 1000:.1f} ms with 64 KiB sent; "
          f"peak +{probe.grown / MiB:.1f} MiB, slowest /healthz "
          f"{probe.slowest_health * 1000:.1f} ms")
    assert status == 401, body
    assert json.loads(body)["error"]["code"] == "unauthorized"
    assert headers["connection"] == "close" and headers["www-authenticate"] == "Bearer"
    assert took < 1.0
    assert probe.grown < 100 * MiB and probe.slowest_health < HEALTH_BOUND


def test_a_read_key_on_a_write_route_is_answered_403_before_the_body(hostile_api, keys):
    size, first = 16 * MiB, b"{" + b" " * (64 * 1024 - 1)
    head = request_head("POST", "/v1/training-jobs", hostile_api.port,
                        ["Content-Type: application/json",
                         f"Authorization: Bearer {keys['read']}"], size)
    with socket.create_connection(("127.0.0.1", hostile_api.port), timeout=3) as sock:
        sock.sendall(head + first)
        status, headers, body = read_answer(sock)
        assert closed(sock)
    assert status == 403 and "'write' scope" in json.loads(body)["error"]["message"]
    assert headers["connection"] == "close"


ROUTES_WITH_BODIES = [("POST", "/v1/training-jobs"), ("POST", "/v1/sweeps"),
                      ("POST", "/v1/embedding-jobs"), ("POST", "/v1/keys"),
                      ("PUT", "/v1/aliases/prod"), ("POST", "/v1/datasets"),
                      ("POST", "/v1/models/1/decode"), ("POST", "/v1/models/1/score"),
                      ("POST", "/v1/embeddings/1/search")]


@pytest.mark.parametrize(("method", "path"), ROUTES_WITH_BODIES)
def test_malformed_json_without_a_key_is_401_not_422(hostile_api, keys, method, path):
    malformed = b'{"dataset_id": 1, "model": {'
    answer = httpx.request(method, f"{hostile_api.url}{path}", content=malformed, timeout=10,
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 401, answer.text
    assert answer.json()["error"]["code"] == "unauthorized"
    # with a key that may call it, the body is read and refused as before
    scope = "admin" if path == "/v1/keys" else "write"
    answer = httpx.request(method, f"{hostile_api.url}{path}", content=malformed, timeout=10,
                           headers={"Content-Type": "application/json", **bearer(keys[scope])})
    # (model 1 may exist in any state here: another module's; 409 when it is not ready)
    assert answer.status_code in (404, 409, 422), answer.text


def test_the_app_never_calls_receive_for_a_request_it_refuses(api_settings):
    """Through the whole middleware stack in this process: no key, a bogus key, a read key
    on a write route — `receive` is not called once."""
    from service.api.app import create_app

    app = create_app(api_settings)
    calls = {"n": 0}

    async def receive():
        calls["n"] += 1
        return {"type": "http.request", "body": b"{", "more_body": True}

    async def run(headers):
        first = await asgi_call(app, "POST", "/v1/training-jobs", "127.0.0.9",
                                [(b"content-type", b"application/json"),
                                 (b"content-length", str(16 * MiB).encode()), *headers],
                                receive)
        return first["status"], dict(first["headers"])

    status, headers = asyncio.run(run([]))
    assert status == 401 and headers[b"connection"] == b"close"
    status, headers = asyncio.run(run([(b"authorization", b"Bearer lb_nope")]))
    assert status == 401 and headers[b"connection"] == b"close"
    assert asyncio.run(run([(b"authorization", b"Basic eDp5")]))[0] == 401
    assert calls["n"] == 0


# --- unknown keys: a negative cache and a limit per address -------------------------------

def test_concurrent_bogus_keys_cannot_all_pass_the_address_limit(hostile_api):
    """The address's token is taken before the lookup: 200 distinct bogus keys sent at once
    from one address get at most the burst of lookups (a limit counted after the lookup
    let every request in flight through: about 200 lookups)."""
    import concurrent.futures

    before = lookups(hostile_api.url)
    transport = httpx.HTTPTransport(local_address="127.0.0.7",
                                    limits=httpx.Limits(max_connections=200))
    with httpx.Client(transport=transport, base_url=hostile_api.url, timeout=30) as c, \
            concurrent.futures.ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(lambda _: c.get("/v1/models", headers=bearer(bogus_key()))
                              .status_code, range(200)))
    spent = lookups(hostile_api.url) - before
    print(f"200 concurrent bogus keys: {codes.count(401)} x 401, {codes.count(429)} x 429, "
          f"{spent:.0f} lookups")
    assert set(codes) <= {401, 429} and codes.count(429) >= 100
    assert spent == codes.count(401) <= 50 + 2 * 30


def test_repeated_bogus_keys_cost_one_lookup_and_malformed_ones_none(api, api_db):
    """Counted independently of the API's code: every statement the app's engine sends
    that reads api_keys (SQLAlchemy's cursor events)."""
    engine = api.server.config.app.state.services.db.engine
    statements = []

    def seen(conn, cursor, statement, *args):
        if "api_keys" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", seen)
    try:
        key = bogus_key()
        with from_address("127.0.0.4", base_url=api.url, timeout=10) as c:
            answers = [c.get("/v1/datasets", headers=bearer(key)).status_code
                       for _ in range(20)]
            after_one = len(statements)
            answers += [c.get("/v1/datasets", headers=bearer("lb_" + "x" * n)).status_code
                        for n in range(1, 10)]
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert answers == [401] * 29
    assert after_one == 1, statements  # the code before this change: 20
    assert len(statements) == 1, statements


@pytest.mark.parametrize("burst, refused", [(2, 0), (1, 19)])
def test_concurrent_first_requests_of_a_key_share_one_lookup(api_env, fresh_key, burst,
                                                             refused):
    """20 requests of a key this process has not seen, at once from one address: one
    lookup. With a failure burst of 2 none is refused (each used to take a token before
    its own lookup: 18 x 429, though the key is good); with 1, the first takes the last
    token and the 19 waiting for its lookup are refused, as the bucket is empty. Lookups
    counted apart from the API's code: the SELECTs from api_keys its engine sends."""
    from service.api.app import create_app

    app = create_app(settings_of(api_env, auth_failures_burst=burst))
    engine = app.state.services.db.engine
    key, statements = fresh_key("read").key, []

    def seen(conn, cursor, statement, *args):
        if statement.startswith("SELECT") and "FROM api_keys" in statement:
            statements.append(statement)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def whoami():
        first = await asgi_call(app, "GET", "/v1/whoami", "127.0.0.8",
                                [(b"authorization", f"Bearer {key}".encode())], receive)
        return first["status"]

    async def at_once():  # all 20 reach the key check before the first lookup ends
        return await asyncio.gather(*(whoami() for _ in range(20)))

    event.listen(engine, "before_cursor_execute", seen)
    try:
        codes = asyncio.run(at_once())
    finally:
        event.remove(engine, "before_cursor_execute", seen)
        app.state.services.db.dispose()
    assert codes == [200] * (20 - refused) + [429] * refused
    assert len(statements) == 1, statements
    assert app.state.services.lookups == {}


def test_a_shared_lookup_outlives_a_cancelled_waiter_fails_for_all_and_yields_to_revoking():
    """Units, with the database faked: the lookup runs as its own task. Cancelling the
    request that started it leaves the others their answer; an error reaches every
    waiter; a finished lookup leaves nothing behind, and the next one asks again; a key
    revoked through this process while its lookup runs is not cached again."""
    from types import SimpleNamespace

    from service.api.auth import forget_key, lookup
    from service.api.ttl_cache import TTLCache

    calls, gate = [], threading.Event()

    def fresh(fn, *args):  # stands for Reads.fresh: one query on the primary
        calls.append(args)
        gate.wait(5)
        if len(calls) == 2:
            raise RuntimeError("the server went away")
        return SimpleNamespace(id=7, scopes=["read"]), "primary"

    svc = SimpleNamespace(lookups={}, keys=TTLCache(10), good_keys=TTLCache(10),
                          unknown_keys=TTLCache(10), reads=SimpleNamespace(fresh=fresh),
                          metrics=SimpleNamespace(key_lookups=SimpleNamespace(
                              inc=lambda: None)))

    async def three_waiters():
        waiters = [asyncio.ensure_future(lookup(svc, "d")) for _ in range(3)]
        await asyncio.sleep(0.05)
        waiters[0].cancel()
        gate.set()
        return await asyncio.gather(*waiters, return_exceptions=True)

    first = asyncio.run(three_waiters())
    assert isinstance(first[0], asyncio.CancelledError)
    assert first[1:] == [(7, {"read"})] * 2 and len(calls) == 1 and svc.lookups == {}
    gate.clear()

    async def two_waiters():
        waiters = [asyncio.ensure_future(lookup(svc, "d")) for _ in range(2)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*waiters, return_exceptions=True)

    second = asyncio.run(two_waiters())
    assert [str(e) for e in second] == ["the server went away"] * 2
    assert len(calls) == 2 and svc.lookups == {}
    gate.clear()

    async def revoked_meanwhile():  # forget_key while the query that found the key runs
        waiter = asyncio.ensure_future(lookup(svc, "d"))
        await asyncio.sleep(0.05)
        forget_key(svc, "d")
        gate.set()
        return await waiter

    assert asyncio.run(revoked_meanwhile()) is None
    assert len(calls) == 3 and svc.keys.get("d") is None and svc.good_keys.get("d") is None


def test_a_flood_of_distinct_bogus_keys_gets_429_after_the_burst(hostile_api):
    before = lookups(hostile_api.url)
    codes, retry = [], set()
    with Probe(hostile_api) as probe, \
            from_address("127.0.0.5", base_url=hostile_api.url, timeout=10) as c:
        for _ in range(150):
            answer = c.get("/v1/models", headers=bearer(bogus_key()))
            codes.append(answer.status_code)
            if answer.status_code == 429:
                retry.add(answer.headers["retry-after"])
                assert "auth_failures_per_second" in answer.json()["error"]["message"]
    spent = lookups(hostile_api.url) - before
    refused = codes.count(401)
    print(f"150 distinct bogus keys in {probe.elapsed:.2f} s: {refused} x 401, "
          f"{codes.count(429)} x 429, {spent:.0f} key lookups; peak +{probe.grown / MiB:.1f} "
          f"MiB, slowest /healthz {probe.slowest_health * 1000:.1f} ms")
    # the burst (50) and what 2 a second refill while the flood runs
    assert set(codes) == {401, 429} and codes[:50] == [401] * 50
    assert refused <= 50 + 2 * probe.elapsed + 1
    assert spent == refused  # each 401 here was one lookup; each 429 none
    assert retry and all(int(r) >= 1 for r in retry)
    assert probe.grown < 100 * MiB and probe.slowest_health < HEALTH_BOUND


def test_the_address_limit_does_not_lock_out_a_key_verified_lately(hostile_api, fresh_key):
    key = fresh_key("read").key
    with from_address("127.0.0.6", base_url=hostile_api.url, timeout=10) as c:
        assert c.get("/v1/whoami", headers=bearer(key)).status_code == 200
        while c.get("/v1/models", headers=bearer(bogus_key())).status_code != 429:
            pass
        assert c.get("/v1/whoami", headers=bearer(key)).status_code == 200
        assert c.get("/v1/models", headers=bearer(bogus_key())).status_code == 429


# --- per-key limits -----------------------------------------------------------------------

def test_a_key_over_its_concurrency_cap_gets_429_with_retry_after(hostile_api, fresh_key):
    """As many requests of one key as its cap held in progress (their bodies never come):
    the next is refused at once; when they end, the key works again."""
    from store.settings import Settings

    cap = Settings.model_fields["max_concurrent_per_key"].default  # hostile_api's
    key = fresh_key("write").key
    head = request_head("POST", "/v1/training-jobs", hostile_api.port,
                        ["Content-Type: application/json", f"Authorization: Bearer {key}"],
                        100)
    held = []
    try:
        for _ in range(cap):
            sock = socket.create_connection(("127.0.0.1", hostile_api.port), timeout=5)
            sock.sendall(head + b"{")
            held.append(sock)
        deadline = time.monotonic() + 15  # a loaded machine takes its time to read them
        with Probe(hostile_api) as probe:
            while True:  # until the server has received them all
                answer = httpx.get(f"{hostile_api.url}/v1/whoami", headers=bearer(key),
                                   timeout=10)
                if answer.status_code == 429 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        assert answer.status_code == 429, answer.text
        assert answer.headers["retry-after"] == "1"
        assert "max_concurrent_per_key" in answer.json()["error"]["message"]
        print(f"request {cap + 1} of a key: 429; slowest /healthz meanwhile "
              f"{probe.slowest_health * 1000:.1f} ms")
        assert probe.slowest_health < HEALTH_BOUND
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while httpx.get(f"{hostile_api.url}/v1/whoami", headers=bearer(key),
                    timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the key's slots were not given back"
        time.sleep(0.05)


def open_stream(port, job_id, key, leftover=None):
    """A raw socket on the job's event stream, and its answer's status (what came after
    the head goes to `leftover`: the first events may come in the same packet)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request_head("GET", f"/v1/jobs/{job_id}/events", port,
                              [f"Authorization: Bearer {key}"]))
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    if leftover is not None:
        leftover.append(data.partition(b"\r\n\r\n")[2])
    return sock, int(data.split(b" ", 2)[1])


def test_a_key_over_its_stream_cap_gets_429_and_its_other_requests_still_run(
        hostile_api, fresh_key, running_job):
    key = fresh_key("read").key
    streams = []
    try:
        for _ in range(16):
            sock, status = open_stream(hostile_api.port, running_job, key)
            streams.append(sock)
            assert status == 200
        answer = httpx.get(f"{hostile_api.url}/v1/jobs/{running_job}/events",
                           headers=bearer(key), timeout=10)
        assert answer.status_code == 429, answer.text
        assert "max_streams_per_key" in answer.json()["error"]["message"]
        assert int(answer.headers["retry-after"]) >= 1
        # streams are counted apart: the key's ordinary requests are not held by them
        assert httpx.get(f"{hostile_api.url}/v1/jobs/{running_job}", headers=bearer(key),
                         timeout=10).status_code == 200
        streams.pop().close()
        deadline = time.monotonic() + 5
        while True:
            sock, status = open_stream(hostile_api.port, running_job, key)
            streams.append(sock)
            if status == 200:
                break
            assert time.monotonic() < deadline, "a closed stream's slot was not given back"
            time.sleep(0.1)
    finally:
        for sock in streams:
            sock.close()


@pytest.mark.stack  # starts uvicorn itself
def test_a_key_over_its_rate_gets_429_with_retry_after(api_env, keys):
    from service.api.app import create_app

    served = Served(create_app(settings_of(api_env, rate_limit_per_second=1,
                                           rate_limit_burst=3)))
    try:
        with httpx.Client(base_url=served.url, timeout=10, headers=bearer(keys["read"])) as c:
            codes = [c.get("/v1/whoami") for _ in range(5)]
            assert [a.status_code for a in codes] == [200, 200, 200, 429, 429]
            assert codes[3].headers["retry-after"] == "1"
            assert "rate_limit_per_second" in codes[3].json()["error"]["message"]
            time.sleep(1.1)
            assert c.get("/v1/whoami").status_code == 200
    finally:
        served.stop()


def test_token_buckets_and_slots():
    now = [0.0]
    buckets = Buckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # 1 token at 2 a second
    assert buckets.wait("b") == 0.0  # another name has its own
    now[0] = 0.25
    assert buckets.wait("a") == pytest.approx(0.25)
    now[0] = 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(0.5)
    now[0] = 100.0
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refills up to the burst only
    few = Buckets(rate=1.0, burst=1, capacity=2, clock=lambda: now[0])
    few.take("x"), few.take("y"), few.take("x")  # y is now the least recently used
    few.take("z")  # room for z: y is forgotten, x keeps its (empty) level
    assert set(few._levels) == {"x", "z"} and few.wait("x") > 0
    few.give("x")
    assert few.wait("x") == 0.0
    slots = Slots(2)
    assert slots.acquire(1) and slots.acquire(1) and not slots.acquire(1)
    assert slots.acquire(2)
    slots.release(1)
    assert slots.acquire(1)
    slots.release(1), slots.release(1), slots.release(2)
    assert slots.held == {}
    assert all(Slots(0).acquire(1) for _ in range(100))


# --- revocation ends event streams --------------------------------------------------------

def read_stream(port, job_id, key, ended, lines):
    lines.append(0)
    sock, lines[0] = open_stream(port, job_id, key, lines)
    sock.settimeout(30)
    with sock:
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            lines.append(chunk)
            if b"".join(x for x in lines if isinstance(x, bytes)).endswith(b"\r\n0\r\n\r\n"):
                break  # the chunked answer's last chunk: the stream has ended
    ended.set()


def test_a_stream_ends_when_its_key_is_revoked_through_the_api(hostile_api, keys, fresh_key,
                                                                running_job):
    key = fresh_key("read")
    ended, seen = threading.Event(), []
    reader = threading.Thread(target=read_stream, args=(hostile_api.port, running_job,
                                                        key.key, ended, seen), daemon=True)
    reader.start()
    deadline = time.monotonic() + 5
    while not any(b"event: progress" in x for x in seen if isinstance(x, bytes)):
        assert time.monotonic() < deadline, seen
        time.sleep(0.05)
    revoked = httpx.delete(f"{hostile_api.url}/v1/keys/{key.id}", headers=bearer(keys["admin"]),
                           timeout=10)
    assert revoked.status_code == 200, revoked.text
    started = time.perf_counter()
    assert ended.wait(3), "the stream went on after its key was revoked"
    took = time.perf_counter() - started
    print(f"stream ended {took * 1000:.0f} ms after DELETE /v1/keys (poll 0.2 s)")
    assert b"the API key was revoked" in b"".join(x for x in seen if isinstance(x, bytes))
    assert httpx.get(f"{hostile_api.url}/v1/whoami", headers=bearer(key.key),
                     timeout=10).status_code == 401


@pytest.mark.slow
def test_a_stream_ends_when_its_key_is_revoked_elsewhere(hostile_api, api_db, fresh_key,
                                                         running_job):
    """Revoked by another process (`latentbank keys revoke` writes the row): the stream
    ends once the verified-key cache (10 s) lets go of the key."""
    from store.keys import revoke_key

    key = fresh_key("read")
    ended, seen = threading.Event(), []
    threading.Thread(target=read_stream, args=(hostile_api.port, running_job, key.key,
                                               ended, seen), daemon=True).start()
    time.sleep(0.5)
    revoke_key(api_db, key.id)
    started = time.perf_counter()
    assert ended.wait(15), "the stream went on after its key was revoked"
    print(f"stream ended {time.perf_counter() - started:.1f} s after the key's row was revoked")


# --- /docs and /metrics -------------------------------------------------------------------

def test_docs_are_served_from_this_server_under_the_ui_policy(hostile_api):
    page = httpx.get(f"{hostile_api.url}/docs", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == UI_POLICY
    assert page.headers["x-content-type-options"] == "nosniff"
    assert "http" not in page.text.lower() and "//" not in page.text  # nothing elsewhere
    assert "<script>" not in page.text  # no inline script (the policy would refuse it)
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert {"ui/vendor/swagger-ui-bundle.js", "ui/vendor/swagger-ui.css",
            "ui/docs.js"} <= set(assets)
    for asset in [*assets, "ui/vendor/LICENSE-swagger-ui.txt", "openapi.json"]:
        answer = httpx.get(f"{hostile_api.url}/{asset}", timeout=10)
        assert answer.status_code == 200, asset
    assert httpx.get(f"{hostile_api.url}/redoc", timeout=10).status_code == 404


def test_openapi_documents_the_scheme_and_the_answers_of_the_auth_layer(api):
    schema = httpx.get(f"{api.url}/openapi.json", timeout=10).json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)
                assert {"401", "429"} <= set(operation["responses"]), (method, path)
                assert "Retry-After" in operation["responses"]["429"]["headers"]
            else:  # the layer asks a key for /v1 (and /metrics off loopback) only
                assert "security" not in operation or path == "/metrics", (method, path)


def flat_routes(routes):
    """Every route, also those inside included routers (FastAPI >= 0.160 keeps them whole)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # FastAPI before 0.160: the routes are flat
        return list(routes)
    return list(iter_route_contexts(routes))


def test_every_route_that_requires_a_scope_is_one_the_layer_guards(api):
    """A route outside /v1 with `require` would be served without the key checked first."""
    from service.api.auth import scope_table

    app = api.server.config.app
    # `require`, in the route's dependencies or as a parameter's (ReadKey, WriteKey, ...)
    guarded = [(r.path, getattr(call, "required_scope", None))
               for r in flat_routes(app.routes)
               for call in [d.dependency for d in (getattr(r, "dependencies", None) or ())]
               + [d.call for d in getattr(getattr(r, "dependant", None), "dependencies", ())]]
    scoped = [(path, needed) for path, needed in guarded if needed]
    assert len(scoped) > 40 and all(path.startswith("/v1/") for path, _ in scoped), scoped
    table = scope_table(app.router.routes)
    assert {needed for *_, needed in table} == {"write", "admin"} and len(table) >= 12


def test_the_scope_patterns_answer_as_a_loop_over_the_route_table_does(api):
    """The layer matches one combined pattern a method and scope; a loop over every route's
    own pattern, taking the highest scope that matches, must agree for every route's path
    (its parameters filled in), for paths no route has, and for every method."""
    from service.api.auth import scope_patterns, scope_table
    from store.keys import SCOPES

    routes = api.server.config.app.router.routes
    table = scope_table(routes)
    patterns = scope_patterns(table)

    def by_loop(method: str, path: str) -> str:
        found = [needed for methods, pattern, needed in table
                 if method in methods and pattern.match(path)]
        return max(found, key=SCOPES.index, default="read")

    def by_patterns(method: str, path: str) -> str:
        return next((needed for pattern, needed in patterns.get(method, ())
                     if pattern.match(path)), "read")

    # every route's own path, its parameters filled in; the same one level deeper; others
    paths = {re.sub(r"\{[^}]+\}", "7", route.path_format)
             for route in flat_routes(routes) if hasattr(route, "path_format")}
    paths |= {path + "/extra" for path in paths} | {"/v1/keys", "/v1/nothing", "/v1/models/7",
                                                   "/v1/models/x/decode", "/metrics", "/v1"}
    answers = {(m, p): by_loop(m, p) for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
               for p in paths}
    assert answers["POST", "/v1/training-jobs"] == answers["DELETE", "/v1/models/7"] == "write"
    assert answers["GET", "/v1/keys"] == "admin" and answers["GET", "/v1/models/7"] == "read"
    assert {k: by_patterns(*k) for k in answers} == answers
    # where two scopes' routes match one path (none here yet), the higher one answers
    table = [(frozenset({"POST"}), re.compile(r"^/v1/a/(?P<x>[^/]+)$"), "write"),
             (frozenset({"POST"}), re.compile(r"^/v1/a/(?P<x>b)$"), "admin")]
    patterns = scope_patterns(table)
    assert [by_patterns("POST", p) for p in ("/v1/a/b", "/v1/a/c", "/v1/a")] == [
        "admin", "write", "read"]
    with pytest.raises(ValueError, match="unknown scope 'wirte'"):  # not passed as read
        scope_patterns([(frozenset({"POST"}), re.compile("^/v1/a$"), "wirte")])


def test_loopback_and_address_rules():
    assert is_loopback("127.0.0.1") and is_loopback("127.3.4.5") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    for host in ("10.0.0.1", "192.168.1.2", "::ffff:10.0.0.1", "2001:db8::1", "", None,
                 "localhost", "testclient"):
        assert not is_loopback(host), host
    local = {"client": ("127.0.0.1", 1), "headers": []}
    proxied = {"client": ("127.0.0.1", 1), "headers": [(b"x-forwarded-for", b"1.2.3.4")]}
    remote = {"client": ("10.0.0.1", 1), "headers": []}
    unix = {"client": None, "headers": []}
    assert metrics_open("loopback", local)
    assert not any(metrics_open("loopback", s) for s in (proxied, remote, unix))
    assert all(metrics_open("open", s) for s in (local, proxied, remote, unix))
    assert not any(metrics_open("key", s) for s in (local, proxied, remote, unix))
    assert client_address({"client": ("2001:db8:1:2:3:4:5:6", 9)}) == "2001:db8:1:2::/64"
    assert client_address({"client": ("::ffff:10.0.0.1", 9)}) == "10.0.0.1"
    assert client_address({"client": ("10.0.0.1", 9)}) == "10.0.0.1"
    assert client_address({"client": None}) == "unknown"


@pytest.mark.parametrize(("access", "client", "headers", "status"), [
    ("loopback", "127.0.0.1", {}, 200),
    ("loopback", "::1", {}, 200),
    ("loopback", "10.1.2.3", {}, 401),
    ("loopback", "127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}, 401),
    ("loopback", "10.1.2.3", "read", 200),
    ("key", "127.0.0.1", {}, 401),
    ("key", "127.0.0.1", "read", 200),
    ("open", "10.1.2.3", {}, 200),
])
def test_metrics_access(api_env, keys, access, client, headers, status):
    from service.api.app import create_app

    app = create_app(settings_of(api_env, metrics_access=access))
    if headers == "read":
        headers = bearer(keys["read"])

    async def get():
        transport = httpx.ASGITransport(app=app, client=(client, 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
            return await c.get("/metrics", headers=headers)

    answer = asyncio.run(get())
    assert answer.status_code == status, answer.text
    if status == 200:
        assert "latentbank_http_request_duration_seconds" in answer.text
