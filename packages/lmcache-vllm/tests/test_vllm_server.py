"""vLLM's OpenAI server with lmcache, driven by ``lmcache bench serve`` (real server, real HTTP).

The server runs its worker in a separate process, so this also covers the
scheduler's lookups over the worker's Unix socket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from lmcache_core.testing.servers import free_port  # noqa: E402


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    import tempfile

    from lmcache_vllm.testing import vllm_server

    tmp_path = tmp_path_factory.mktemp("vllm-server")
    metrics_port = free_port()
    sockets = tempfile.mkdtemp(prefix="lmc-")  # short: Unix socket paths are limited
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "512MiB",
        "LMCACHE_METRICS_PORT": str(metrics_port),
        "LMCACHE_SOCKET_DIR": str(tmp_path),
    }
    with vllm_server(tiny_model, "kv_both", env, tmp_path / "vllm.log") as port:
        yield port, metrics_port, Path(sockets)


def bench_serve(port: int, *args: str) -> dict:
    """Run ``lmcache bench serve --json`` against the server; its parsed summary."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmcache_core.cli",
            "bench",
            "serve",
            "--base-url",
            f"http://127.0.0.1:{port}",
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bench_serve_against_a_real_server_hits_the_cache(server):
    port, metrics_port, _sockets = server
    summary = bench_serve(
        port,
        "--docs",
        "2",
        "--doc-words",
        "500",
        "--passes",
        "2",
        "--metrics-url",
        f"http://127.0.0.1:{metrics_port}/metrics",
    )
    first, second = summary["passes"]
    assert first["errors"] == 0 and second["errors"] == 0
    assert first["mean_prompt_tokens"] > 500
    m = summary["lmcache"]
    # The second pass found both documents' full chunks. The worker runs in its own
    # process here, so these hits came through the lookup socket.
    assert m["lmcache:num_lookup_hits"] >= 2 * 512
    assert m["lmcache:num_hit_tokens"] >= 2 * 512
    assert m["lmcache:stored_bytes"] > 0


def test_multi_round_qa_runs_against_the_same_server(server):
    """The load generator: users in parallel, rounds resending the history, hits read from
    vLLM's own /metrics."""
    port, _metrics_port, _ = server
    result = bench_serve(
        port,
        "--workload",
        "multi-round-qa",
        "--users",
        "3",
        "--rounds",
        "2",
        "--system-words",
        "100",
        "--context-words",
        "200",
        "--question-words",
        "20",
        "--concurrency",
        "2",
    )
    rounds = result["passes"]
    assert [r["requests"] for r in rounds] == [3, 3]
    assert rounds[1]["mean_prompt_tokens"] > rounds[0]["mean_prompt_tokens"]
    summary = result["summary"]
    assert summary["failed"] == 0 and summary["ttft_s"]["p50"] > 0
    assert summary["itl_s"]["p50"] > 0 and summary["output_token_throughput"] > 0
    # Round 2 resends round 1's prompt: lmcache finds its chunks.
    assert summary["hit_rate"]["lmcache"] > 0.2


def _families(url: str) -> dict:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _exposed_names(families: dict) -> set[str]:
    """Every series name a query can use: counters as ``_total``, histograms by part."""
    names = set()
    for name, f in families.items():
        if f.type == "counter":
            names.add(f"{name}_total")
        elif f.type == "histogram":
            names.update(f"{name}{s}" for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(name)
        names.update(s.name for s in f.samples)
    return names


def test_lmcache_metrics_are_on_vllms_own_metrics_endpoint(server):
    """Through vLLM's connector stats API: vLLM's /metrics has them all, from the worker."""
    import time

    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_core.metrics import METRICS
    from lmcache_vllm.testing import complete

    port, metrics_port, _ = server
    prompt = " ".join(f"metrics{i}" for i in range(250))
    complete(port, prompt, max_tokens=2)
    complete(port, prompt, max_tokens=2)  # a hit
    vllm_url = f"http://127.0.0.1:{port}/metrics"
    exporter_url = f"http://127.0.0.1:{metrics_port}/metrics"
    families = _families(vllm_url)
    assert set(METRICS) <= set(families), set(METRICS) - set(families)
    hits = families["lmcache:num_hit_tokens"]
    assert hits.type == "counter"
    assert {s.labels.get("model_name") for s in hits.samples} == {str(server_model(port))}
    # The same counts as the worker's own exporter, once vLLM has carried the last step:
    # counters and every histogram's count (they ran one observation behind: the ones made
    # before vLLM's first step were dropped).
    counters = [n for n, s in METRICS.items() if s.kind == "counter"]
    counters += [f"{n}_count" for n, s in METRICS.items() if s.kind == "histogram"]
    deadline = time.monotonic() + 20
    while True:
        ours, theirs = scrape_metrics(exporter_url), scrape_metrics(vllm_url)
        same = all(ours.get(n, 0) == theirs.get(n, 0) for n in counters)
        if same or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ours["lmcache:num_hit_tokens"] >= 256
    assert {n: theirs.get(n, 0) for n in counters} == {n: ours.get(n, 0) for n in counters}
    assert theirs["lmcache:time_to_retrieve_count"] == ours["lmcache:time_to_retrieve_count"] > 0
    usage = families["lmcache:usage_bytes"]
    assert {s.labels["rank"] for s in usage.samples} == {"0"}


def server_model(port: int) -> str:
    import json
    import urllib.request

    models = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models").read())
    return models["data"][0]["id"]


def test_grafana_dashboard_queries_only_metrics_the_server_exports(server):
    """Every metric the dashboard in docs/grafana queries is on the running server's /metrics."""
    import re

    from lmcache_vllm.testing import complete

    port, _metrics_port, _ = server
    complete(port, "dashboard " * 40, max_tokens=2)
    dashboard = Path(__file__).parents[3] / "docs" / "grafana" / "lmcache-dashboard.json"
    spec = json.loads(dashboard.read_text())
    exprs = [t["expr"] for p in spec["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in spec["templating"]["list"] if v["type"] == "query"]
    queried = {m for e in exprs for m in re.findall(r"\b(?:lmcache|vllm):[a-zA-Z0-9_]+", e)}
    assert len(queried) >= 20
    exposed = _exposed_names(_families(f"http://127.0.0.1:{port}/metrics"))
    assert queried <= exposed, f"queried but not exported: {sorted(queried - exposed)}"


def test_per_request_controls_over_http(server):
    """Upstream LMCache's ``kv_transfer_params`` controls, sent by an HTTP client:
    ``lmcache.skip_save`` stores nothing (and still loads), ``lmcache.tag.*`` keys apart."""
    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_vllm.testing import complete

    port, metrics_port, _ = server
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    def stored() -> float:
        return scrape_metrics(url).get("lmcache:stored_bytes", 0)

    def loaded() -> float:
        return scrape_metrics(url).get("lmcache:num_hit_tokens", 0)

    prompt = " ".join(f"controls{i}" for i in range(300))
    before = stored()
    complete(port, prompt, max_tokens=1, kv_transfer_params={"lmcache.skip_save": True})
    assert stored() == before, "lmcache.skip_save stored nothing"
    hits = loaded()
    complete(port, prompt, max_tokens=1)  # nothing of it was cached: computed, now stored
    assert loaded() == hits and stored() > before

    tagged = " ".join(f"tagged{i}" for i in range(300))
    alice = {"lmcache.tag.user": "alice"}
    first = complete(port, tagged, max_tokens=4, kv_transfer_params=alice)
    hits = loaded()
    complete(port, tagged, max_tokens=4, kv_transfer_params={"lmcache.tag.user": "bob"})
    complete(port, tagged, max_tokens=4)
    assert loaded() == hits, "another tag, or none, does not find alice's KV"
    again = complete(port, tagged, max_tokens=4, kv_transfer_params=alice)
    assert loaded() >= hits + 256 and again == first
    hits, kept = loaded(), stored()
    complete(port, tagged, max_tokens=1, kv_transfer_params={**alice, "lmcache.skip_save": True})
    assert loaded() >= hits + 256 and stored() == kept, "skip_save loads, stores nothing"


def test_hits_are_counted_by_source_on_vllms_own_metric(server):
    """vLLM 0.32's ``vllm:prompt_tokens_cached_by_source``: lmcache's hits from DRAM count
    as ``host`` (they were ``external_unspecified``, the default for a connector)."""
    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_vllm.testing import complete

    port, metrics_port, _ = server

    def by_source() -> dict[str, float]:
        fams = _families(f"http://127.0.0.1:{port}/metrics")
        fam = fams.get("vllm:prompt_tokens_cached_by_source")
        assert fam is not None, "this vLLM has no per-source metric"
        return {s.labels["source"]: s.value for s in fam.samples if s.name.endswith("_total")}

    def loaded() -> float:
        return scrape_metrics(f"http://127.0.0.1:{metrics_port}/metrics").get(
            "lmcache:num_hit_tokens", 0
        )

    prompt = " ".join(f"sources{i}" for i in range(300))
    complete(port, prompt, max_tokens=1)
    before, hits = by_source(), loaded()
    complete(port, prompt, max_tokens=1)  # from lmcache's DRAM tier
    import time

    deadline = time.monotonic() + 20
    while (after := by_source()).get("host", 0) == before.get("host", 0):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    got = loaded() - hits
    assert got >= 256
    assert after.get("host", 0) - before.get("host", 0) == got
    assert after.get("external_unspecified", 0) == before.get("external_unspecified", 0)
