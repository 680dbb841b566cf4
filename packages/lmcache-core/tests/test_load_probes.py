"""The single-request probes beside a load run, against a scripted server with two caches.

The server answers a prompt after UNCACHED s when it has never seen its context, after
CONNECTOR s when only the "connector" holds it and ENGINE s when its own prefix cache does;
``POST /reset_prefix_cache`` empties the latter (as vLLM's dev-mode endpoint does). The
real-vLLM run is tools/bench_load.py's.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lmcache_core.bench.loadgen import LoadSpec
from lmcache_core.bench.probes import (
    cached_ttft_under_concurrency,
    ideal,
    single_request_times,
)

pytest.importorskip("httpx")

UNCACHED, CONNECTOR, ENGINE = 0.30, 0.08, 0.01


class TwoCacheServer:
    def __init__(self, resettable: bool = True) -> None:
        self.engine: set[str] = set()
        self.connector: set[str] = set()
        self.resets = 0
        compute = threading.Lock()  # one "forward" at a time: concurrency stretches TTFT
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _json(self, code: int, obj: object) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._json(200, {"data": [{"id": "two-cache"}]})

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                if self.path.startswith("/reset_prefix_cache"):
                    if not resettable:
                        return self._json(404, {"detail": "Not Found"})
                    with lock:
                        outer.engine.clear()
                        outer.resets += 1
                    return self._json(200, {"success": True})
                req = json.loads(raw)
                key = req["prompt"].split("User:")[0]  # the context: what a cache would hold
                with lock:
                    delay = (
                        ENGINE
                        if key in outer.engine
                        else CONNECTOR
                        if key in outer.connector
                        else UNCACHED
                    )
                    outer.engine.add(key)
                    outer.connector.add(key)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                with compute:
                    time.sleep(delay)
                for i in range(req["max_tokens"]):
                    event = {"choices": [{"text": f" a{i}"}]}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                usage = {"prompt_tokens": len(req["prompt"].split()), "completion_tokens": 1}
                self.wfile.write(
                    f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                )
                self.wfile.write(b"data: [DONE]\n\n")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = TwoCacheServer()
    yield s
    s.close()


SPEC = LoadSpec(users=5, rounds=3, context_words=40, question_words=4, answer_tokens=2)


def test_single_request_times_measure_the_connector_not_the_engine_cache(server):
    times = asyncio.run(single_request_times(server.url, SPEC, probes=2))
    assert times["engine_prefix_cache_reset"] is True and server.resets == 2 * 2
    first, *later = times["rounds"]
    assert first["e2e_s"] >= UNCACHED
    # Later rounds hit the connector (the engine's cache was emptied before each).
    assert all(CONNECTOR <= r["e2e_s"] < UNCACHED for r in later)
    assert later[-1]["prompt_tokens"] > first["prompt_tokens"]  # histories grow
    best = ideal(SPEC, times)
    total = SPEC.users * sum(r["e2e_s"] for r in times["rounds"])
    assert best["duration_s"] == pytest.approx(total)
    assert best["request_throughput"] == pytest.approx(15 / total)


def test_without_a_reset_endpoint_the_result_says_so():
    s = TwoCacheServer(resettable=False)
    try:
        times = asyncio.run(single_request_times(s.url, SPEC, probes=1))
    finally:
        s.close()
    assert times["engine_prefix_cache_reset"] is False
    assert all(r["e2e_s"] < CONNECTOR for r in times["rounds"][1:])  # the engine's own hits


def test_cached_ttft_under_concurrency_compares_medians(server):
    out = asyncio.run(
        cached_ttft_under_concurrency(server.url, context_words=30, prompts=4, concurrency=4)
    )
    assert out["engine_prefix_cache_reset"] is True
    assert out["uncached_ttft_s"] >= UNCACHED
    assert CONNECTOR <= out["single_ttft_p50_s"] < UNCACHED
    # The server computes one request at a time: four together wait for each other.
    assert out["ratio"] > 1.5 and out["concurrent_ttft_max_s"] >= 3.5 * CONNECTOR
