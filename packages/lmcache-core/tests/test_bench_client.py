"""Benchmarks fail loudly: a request a server refuses carries the server's reason (and, for a
prompt too long, its length in tokens against the server's max-model-len), and a benchmark
whose requests failed raises or exits non-zero instead of printing NaN. Also the paired
A/B runner: the same warm-up for every server, the order flipped per prompt."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from lmcache_core.bench.client import (
    BenchmarkFailed,
    OpenAIClient,
    failure_summary,
    http_failure,
    lengths_in_message,
    require_ok,
    run_passes,
)
from lmcache_core.bench.paired import UNCACHED, cached_pass, run_paired, spread
from lmcache_core.cli import main as cli_main

MAX_LEN = 4096
TOO_LONG = (
    "This model's maximum context length is 4096 tokens. However, your prompt contains "
    "5012 input tokens, which exceeds this limit even without any output tokens. "
    "Please reduce the length of the input prompt."
)


class FakeServer:
    """An OpenAI-style server: prompts of more than ``MAX_LEN`` words are refused with
    vLLM's 400 (and ``/tokenize`` counts words); others stream ``' ok'``. Each request's
    prompt is recorded, in order, with the server's name."""

    def __init__(self, name: str = "fake", log: list | None = None, error: str = "") -> None:
        self.name = name
        self.log = log if log is not None else []
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
                self._json(200, {"data": [{"id": "fake-model", "max_model_len": MAX_LEN}]})

            def do_POST(self):
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                words = len(req["prompt"].split())
                if self.path == "/tokenize":
                    return self._json(200, {"count": words, "max_model_len": MAX_LEN})
                outer.log.append((outer.name, req["prompt"]))
                if error:
                    return self._json(500, {"error": {"message": error, "code": 500}})
                if words > MAX_LEN:
                    msg = TOO_LONG.replace("5012", str(words))
                    return self._json(400, {"error": {"message": msg, "code": 400}})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                event = {"choices": [{"text": " ok"}], "usage": None}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                usage = {"prompt_tokens": words, "completion_tokens": 1}
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
    s = FakeServer()
    yield s
    s.close()


LONG = "word " * 5012
SHORT = "a short prompt"


def test_a_refused_prompt_carries_the_servers_reason_and_its_length(server):
    client = OpenAIClient(server.url)
    r = client.complete(LONG, max_tokens=1, label="doc0")
    assert r.error is not None
    assert r.error.startswith("HTTP 400: This model's maximum context length is 4096 tokens.")
    assert "the prompt is 5012 tokens, longer than the server's max-model-len of 4096" in r.error
    assert client.complete(SHORT).error is None


def test_check_raises_with_the_reason(server):
    client = OpenAIClient(server.url)
    with pytest.raises(BenchmarkFailed, match=r"request doc0 to .* failed: HTTP 400: .*5012 tok"):
        client.complete(LONG, max_tokens=1, label="doc0", check=True)


def test_all_requests_failing_is_an_error_that_says_why(server):
    client = OpenAIClient(server.url)
    results = run_passes(client, [("pass 1", [("doc0", LONG), ("doc1", LONG)])])
    with pytest.raises(BenchmarkFailed) as e:
        require_ok(results[0].requests)
    text = str(e.value)
    assert text.startswith("2 of 2 requests failed:")
    assert "doc0, doc1: HTTP 400:" in text and "max-model-len of 4096" in text
    assert failure_summary([r for r in results[0].requests if r.error is None]) is None


def test_a_server_error_in_plain_words():
    s = FakeServer(error="CUDA out of memory. Tried to allocate 2.00 GiB")
    try:
        r = OpenAIClient(s.url).complete(SHORT)
        assert r.error == "HTTP 500: CUDA out of memory. Tried to allocate 2.00 GiB"
    finally:
        s.close()


def test_an_unreachable_server_fails_with_what_to_fix():
    with pytest.raises(BenchmarkFailed, match="cannot list its models"):
        OpenAIClient("http://127.0.0.1:9", timeout_s=2)


def test_length_messages_of_vllm_are_read():
    assert lengths_in_message(TOO_LONG) == (5012, 4096)
    at_least = TOO_LONG.replace("5012 input", "at least 4097 input")
    assert lengths_in_message(at_least) == (4097, 4096)
    engine = "The decoder prompt (length 5000) is longer than the maximum model length of 4096."
    assert lengths_in_message(engine) == (5000, 4096)
    chars = "This model's maximum context length is 2048 tokens. However, your prompt contains "
    assert lengths_in_message(chars + "20000 characters (more than ...)") == (None, 2048)
    assert lengths_in_message("bad temperature") == (None, None)
    # The message's own figures when the server could not be asked; the server's when it could.
    body = json.dumps({"error": {"message": engine}})
    assert "the prompt is 5000 tokens" in http_failure(400, body)
    assert "the prompt is 5100 tokens" in http_failure(400, body, prompt_tokens=5100)
    assert http_failure(400, '{"error": {"message": "bad temperature"}}') == (
        "HTTP 400: bad temperature"
    )
    assert http_failure(404, b"Not Found") == "HTTP 404: Not Found"


def test_the_load_generator_reports_the_servers_reason(server):
    pytest.importorskip("httpx")
    from lmcache_core.bench.loadgen import LoadSpec, run_load

    spec = LoadSpec(users=2, rounds=2, context_words=5012, concurrency=2)
    samples, _, _ = asyncio.run(run_load(server.url, spec))
    assert len(samples) == 2  # each user stops at its failed first round
    summary = failure_summary(samples)
    assert summary is not None and summary.startswith("2 of 2 requests failed:")
    assert "user 0 round 1" in summary and "user 1 round 1" in summary
    assert "longer than the server's max-model-len of 4096" in summary


def test_bench_serve_exits_non_zero_with_the_reason(server, capsys):
    rc = cli_main(
        ["bench", "serve", "--base-url", server.url, "--docs", "2", "--doc-words", "5012"]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "4 of 4 requests failed:" in err  # 2 documents, 2 passes
    assert "HTTP 400: This model's maximum context length is 4096 tokens" in err
    assert "max-model-len of 4096" in err


def test_multi_round_bench_serve_exits_non_zero_with_the_reason(server, capsys):
    pytest.importorskip("httpx")
    rc = cli_main(
        [
            "bench", "serve", "--base-url", server.url, "--workload", "multi-round-qa",
            "--users", "1", "--rounds", "1", "--system-words", "0", "--context-words", "5012",
        ]
    )  # fmt: skip
    assert rc == 1
    assert "max-model-len of 4096" in capsys.readouterr().err


def test_spread_is_the_median_with_quartiles_and_range():
    s = spread([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.q1, s.q3, s.lo, s.hi) == (5, 3.0, 2.0, 4.0, 1.0, 5.0)
    assert spread([2.0]).median == 2.0 and spread([]).n == 0
    assert "IQR 2.000-4.000" in str(s)


def test_paired_runs_warm_every_server_alike_and_flip_the_order():
    log: list = []
    a, b = FakeServer("a", log), FakeServer("b", log)
    try:
        clients = {"a": OpenAIClient(a.url), "b": OpenAIClient(b.url)}
        prompts = [(f"p{i}", f"prompt {i}") for i in range(4)]
        run = run_paired(
            clients, prompts, warmup=["w0", "w1"], passes=2, repeat_on=["b"], max_tokens=1
        )
    finally:
        a.close()
        b.close()
    warm, measured = log[:8], log[8:]
    assert sorted(warm) == sorted([(s, w) for s in "ab" for w in ("w0", "w1")] * 2)
    # Per prompt: each server back to back, the first server alternating; b repeats.
    firsts = [measured[i][0] for i in range(0, len(measured), 3)]
    assert firsts == ["a", "b", "a", "b"]
    assert [p for _, p in measured] == [p for _, p in prompts for _ in range(3)]
    assert set(run.results) == {("a", UNCACHED), ("b", UNCACHED), ("b", cached_pass(2))}
    assert len(run.ratios(("b", UNCACHED), ("a", UNCACHED))) == 4


def test_a_paired_run_stops_at_the_first_failure_with_the_reason(server):
    with pytest.raises(BenchmarkFailed, match="request doc1 .* max-model-len of 4096"):
        run_paired({"x": OpenAIClient(server.url)}, [("doc0", SHORT), ("doc1", LONG)], max_tokens=1)


def test_a_paired_run_lets_the_last_server_settle_before_switching(monkeypatch):
    import lmcache_core.bench.paired as paired

    log: list = []
    sleeps: list[float] = []
    monkeypatch.setattr(paired.time, "sleep", sleeps.append)
    a, b = FakeServer("a", log), FakeServer("b", log)
    try:
        clients = {"a": OpenAIClient(a.url), "b": OpenAIClient(b.url)}
        prompts = [(f"p{i}", f"prompt {i}") for i in range(4)]
        run_paired(clients, prompts, passes=2, repeat_on=["b"], max_tokens=1, settle_s=1.5)
    finally:
        a.close()
        b.close()
    switches = sum(1 for x, y in itertools.pairwise(log) if x[0] != y[0])
    assert switches == 4 and sleeps == [1.5] * switches  # a pause at each switch, only there
