"""The load generator against a scripted OpenAI-style server (the real-vLLM run is in
lmcache-vllm's test_vllm_server.py): concurrency, rates, histories, timings, outputs."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lmcache_core.bench.loadgen import LoadSpec, percentiles, run_load, summarize
from lmcache_core.errors import ConfigError

pytest.importorskip("httpx")

TOKEN_GAP = 0.02
FIRST_TOKEN = 0.05


class ScriptedServer:
    """Streams ' w0 w1 ...' (a token every TOKEN_GAP s after FIRST_TOKEN s); counts in-flight."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.starts: list[float] = []
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps({"data": [{"id": "scripted"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    outer.prompts.append(req["prompt"])
                    outer.starts.append(time.monotonic())
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    time.sleep(FIRST_TOKEN)
                    n = req["max_tokens"]
                    for i in range(n):
                        event = {"choices": [{"text": f" w{i}"}]}
                        self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                        self.wfile.flush()
                        if i < n - 1:
                            time.sleep(TOKEN_GAP)
                    usage = {"prompt_tokens": len(req["prompt"].split()), "completion_tokens": n}
                    last = json.dumps({"choices": [], "usage": usage})
                    self.wfile.write(f"data: {last}\n\n".encode())
                    self.wfile.write(b"data: [DONE]\n\n")
                finally:
                    with lock:
                        outer.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


def test_concurrency_bounds_requests_in_flight_and_histories_grow(server):
    spec = LoadSpec(
        users=4, rounds=3, context_words=50, question_words=5, answer_tokens=4, concurrency=2
    )
    samples, wall, model = asyncio.run(run_load(server.url, spec))
    assert model == "scripted" and len(samples) == 12
    assert server.max_in_flight == 2
    # Each round resends the history, the server's answer included.
    later = [p for p in server.prompts if p.count("User:") == 3]
    assert len(later) == 4 and all(p.count(" w0 w1 w2 w3") == 2 for p in later)
    s = summarize(samples, wall)
    assert s["failed"] == 0 and s["requests"] == 12
    assert s["ttft_s"]["p50"] >= FIRST_TOKEN * 0.9
    assert len(samples[0].itl_s) == 3 and s["itl_s"]["p50"] >= TOKEN_GAP * 0.8
    assert [r["requests"] for r in s["rounds"]] == [4, 4, 4]
    assert s["rounds"][2]["mean_prompt_tokens"] > s["rounds"][0]["mean_prompt_tokens"]
    assert s["output_token_throughput"] > 0 and s["request_throughput"] > 0


def test_a_rate_spaces_the_starts(server):
    spec = LoadSpec(users=6, rounds=1, context_words=10, answer_tokens=1, concurrency=6, rate=20.0)
    samples, _wall, _ = asyncio.run(run_load(server.url, spec))
    assert len(samples) == 6
    gaps = [b - a for a, b in zip(sorted(server.starts), sorted(server.starts)[1:])]
    assert sum(gaps) > 0.1  # six Poisson arrivals at 20/s: about 0.25 s, not all at once


def test_a_duration_brings_users_back_until_it_ends(server):
    spec = LoadSpec(
        users=2, rounds=2, context_words=10, question_words=3, answer_tokens=2, concurrency=2,
        duration_s=1.0,
    )  # fmt: skip
    samples, _wall, _ = asyncio.run(run_load(server.url, spec))
    # Each request takes ~0.07 s: more than users x rounds fit in 1 s.
    assert len(samples) > 2 * 2 and all(s.error is None for s in samples)
    assert all(s.start_s < 1.0 for s in samples)  # none started after the end
    # A returning user starts over: round 0 again, with its context but no old turns.
    firsts = [p for p in server.prompts if p.count("User:") == 1]
    assert len(firsts) > 2 and len(set(firsts)) == 2


def test_percentiles_and_bad_specs():
    p = percentiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert p["p50"] == 3.0 and p["mean"] == 3.0 and 4.9 < p["p99"] <= 5.0
    with pytest.raises(ConfigError, match="concurrency"):
        LoadSpec(concurrency=0)
    with pytest.raises(ConfigError, match="rate"):
        LoadSpec(rate=0)
    with pytest.raises(ConfigError, match="duration_s"):
        LoadSpec(duration_s=0)


def test_cli_writes_json_and_an_svg_plot(server, tmp_path, capsys):
    from lmcache_core.cli import main

    out, svg = tmp_path / "run.json", tmp_path / "ttft.svg"
    rc = main(
        [
            "bench", "serve", "--base-url", server.url, "--workload", "multi-round-qa",
            "--users", "3", "--rounds", "2", "--system-words", "20", "--context-words", "30",
            "--question-words", "5", "--max-tokens", "3", "--concurrency", "2",
            "--label", "scripted", "--out", str(out), "--plot", str(svg), "--json",
        ]
    )  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"]["requests"] == 6 and len(printed["passes"]) == 2
    saved = json.loads(out.read_text())
    assert len(saved["samples"]) == 6 and saved["label"] == "scripted"
    assert svg.read_text().count("<circle") == 6
    both = tmp_path / "both.svg"
    assert main(["bench", "plot", str(out), str(out), "-o", str(both)]) == 0
    assert both.read_text().count("<circle") == 12
