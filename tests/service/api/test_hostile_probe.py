"""The hostile-input suite's yardstick, checked against a process whose costs we choose:
Probe must see memory the process takes and a /healthz that stalls (else every bound the
suite asserts would pass vacuously)."""

import subprocess
import sys
import time

import httpx

from service.cli.ports import free_port
from tests.support import Probe

MiB = 1 << 20

SERVER = r"""
import sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer
held = []
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/alloc/"):
            held.append(bytearray(int(self.path.split("/")[2]) << 20))  # touched: resident
            held.clear()
        elif self.path.startswith("/stall/"):
            time.sleep(float(self.path.split("/")[2]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


class Toy:
    """A single-threaded HTTP server: /alloc/N touches N MiB and frees it, /stall/S sleeps."""

    def __init__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(self.port)])
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_probe_sees_a_transient_allocation_and_a_stalled_health_check():
    toy = Toy()
    try:
        with Probe(toy) as quiet:
            httpx.get(f"{toy.url}/alloc/0", timeout=10)
        with Probe(toy) as hungry:
            httpx.get(f"{toy.url}/alloc/300", timeout=30)  # freed before the probe ends
        with Probe(toy) as stalled:
            httpx.get(f"{toy.url}/stall/0.4", timeout=10)
    finally:
        toy.proc.kill()
        toy.proc.wait()
    assert quiet.grown < 20 * MiB
    assert 280 * MiB < hungry.grown < 400 * MiB  # the peak, though the memory was freed
    # the server answers one request at a time: /healthz waited behind the stall
    assert stalled.slowest_health > 0.2 and quiet.slowest_health < stalled.slowest_health
