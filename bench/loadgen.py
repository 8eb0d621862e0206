"""A lean HTTP/1.1 load client, run by the benches in a process of its own so that the
client's work is not counted against the server's event loop.

`clients` keep-alive connections each send the same request back to back for `seconds`
and read each answer whole (status line, Content-Length, body). Prints one JSON line:
requests/s, p50 and p99 in ms, requests, and the first answer's body length.

`--client httpx` sends the same requests with an ordinary client instead (one
`httpx.Client` per connection, in a thread each): what a Python caller of the service
sees, with the client's own parsing and copying counted.

    python bench/loadgen.py --port P --path /v1/models/1/decode --body z.npy \
        --header 'Authorization: Bearer ...' --header 'Content-Type: application/x-npy' \
        --clients 64 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from collections.abc import Callable

import numpy as np

_LENGTH = re.compile(rb"\r\ncontent-length: *([0-9]+)", re.IGNORECASE)


def request_bytes(host: str, port: int, path: str, headers: list[str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", *headers,
             f"Content-Length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode() + body


async def connection(host: str, port: int, request: bytes, stop: float,
                     latencies: list[float], sizes: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            found = _LENGTH.search(head)
            body = await reader.readexactly(int(found[1]) if found else 0)
            if head[9:12] != b"200":
                raise RuntimeError(f"answer {head[:12]!r}: {body[:300]!r}")
            latencies.append(time.perf_counter() - t0)
            if not sizes:
                sizes.append(len(body))
    finally:
        writer.close()


def caller(kind: str, host: str, port: int, path: str, headers: list[str],
           body: bytes) -> Callable[[], None]:
    """One keep-alive connection as a function that sends the request and reads its answer
    whole: for paired measurements, where one caller takes turns with others request by
    request (bench/serve.py). `lean`: a blocking socket, the answer read into one buffer;
    `httpx`: an `httpx.Client`."""
    if kind == "httpx":
        import httpx

        client = httpx.Client(headers=dict(h.split(": ", 1) for h in headers), timeout=30)
        url = f"http://{host}:{port}{path}"

        def post_httpx() -> None:
            answer = client.post(url, content=body)
            if answer.status_code != 200:
                raise RuntimeError(f"answer {answer.status_code}: {answer.text[:300]}")

        return post_httpx
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = request_bytes(host, port, path, headers, body)
    buffer = bytearray(1 << 16)

    def post_lean() -> None:
        sock.sendall(request)
        got, end = 0, -1
        while end < 0:
            got += _receive(sock, buffer, got)
            end = buffer.find(b"\r\n\r\n", 0, got)
        found = _LENGTH.search(bytes(buffer[:end + 2]))
        if found is None:  # no way to tell where this answer ends and the next begins
            raise RuntimeError(f"an answer without Content-Length: {bytes(buffer[:end])!r}")
        need = end + 4 + int(found[1])
        if len(buffer) < need:  # grown in place, kept for the next answer
            buffer.extend(bytes(need - len(buffer)))
        while got < need:
            got += _receive(sock, buffer, got)
        if buffer[9:12] != b"200":
            raise RuntimeError(f"answer {bytes(buffer[:12])!r}: "
                               f"{bytes(buffer[end + 4:end + 304])!r}")

    return post_lean


def _receive(sock: socket.socket, buffer: bytearray, at: int) -> int:
    if at >= len(buffer):  # a head longer than the buffer: grown in place
        buffer.extend(bytes(len(buffer)))
    n = sock.recv_into(memoryview(buffer)[at:])
    if n == 0:
        raise ConnectionError("the server closed the connection")
    return n


def summary(latencies: list[float], elapsed: float, sizes: list[int]) -> dict[str, float]:
    ms = 1000 * np.asarray(latencies)
    return {"rps": len(latencies) / elapsed, "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)), "n": len(latencies), "bytes": sizes[0]}


def with_httpx(args: argparse.Namespace) -> dict[str, float]:
    import threading

    import httpx

    with open(args.body, "rb") as f:
        body = f.read()
    headers = dict(h.split(": ", 1) for h in args.header)
    url = f"http://{args.host}:{args.port}{args.path}"
    latencies: list[float] = []
    sizes: list[int] = []
    errors: list[BaseException] = []

    def connection(stop: float, out: list[float]) -> None:
        try:
            with httpx.Client(headers=headers, timeout=30) as client:
                while time.perf_counter() < stop:
                    t0 = time.perf_counter()
                    answer = client.post(url, content=body)
                    if answer.status_code != 200:
                        raise RuntimeError(f"answer {answer.status_code}: "
                                           f"{answer.text[:300]}")
                    out.append(time.perf_counter() - t0)
                    if not sizes:
                        sizes.append(len(answer.content))
        except BaseException as exc:  # a thread's error would otherwise go unseen
            errors.append(exc)

    connection(time.perf_counter() + 0.3, [])  # warm-up
    if errors:
        raise errors[0]
    stop = time.perf_counter() + args.seconds
    t0 = time.perf_counter()
    threads = [threading.Thread(target=connection, args=(stop, latencies))
               for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return summary(latencies, elapsed, sizes)


async def run(args: argparse.Namespace) -> dict[str, float]:
    with open(args.body, "rb") as f:
        request = request_bytes(args.host, args.port, args.path, args.header, f.read())
    warm: list[float] = []
    sizes: list[int] = []
    await connection(args.host, args.port, request, time.perf_counter() + 0.3, warm, sizes)
    latencies: list[float] = []
    stop = time.perf_counter() + args.seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(connection(args.host, args.port, request, stop, latencies, sizes)
                           for _ in range(args.clients)))
    return summary(latencies, time.perf_counter() - t0, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--body", required=True, help="a file holding the request body")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--client", choices=("lean", "httpx"), default="lean")
    args = parser.parse_args()
    if args.client == "httpx":
        print(json.dumps(with_httpx(args)))
        return
    try:
        from uvloop import run as run_loop
    except ImportError:
        run_loop = asyncio.run
    print(json.dumps(run_loop(run(args))))


if __name__ == "__main__":
    main()
