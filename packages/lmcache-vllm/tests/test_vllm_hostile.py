"""Hostile request controls in real vLLM: in-process, and vLLM's OpenAI server (its engine
in another process) against an lmcache server. A lone surrogate in ``cache_salt`` or in an
``lmcache.tag.*`` name or value costs that request its cache, and nothing else: the engine
serves it, and every ordinary request after it runs and hits as before.

The scheduler-side units (each hook's error path) are in ``test_hostile_requests.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

SCENARIOS = Path(__file__).with_name("hostile_scenarios.py")
#: As test_vllm_mp.py's.
CACHE = {"chunk_size": 256, "max_local_cpu_size": "256MiB"}
PROMPT = " ".join(f"shared{i} document words" for i in range(120))  # ~600 tokens


def vllm_env(**more: str) -> dict[str, str]:
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", **more}


def external_hits(port: int) -> float:
    from lmcache_core.bench.scrape import scrape_metrics

    m = scrape_metrics(f"http://127.0.0.1:{port}/metrics", prefix="vllm:")
    return m.get("vllm:external_prefix_cache_hits", 0.0)


def run_scenario(name: str, model: Path, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCENARIOS), name, str(model)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env},
        cwd=SCENARIOS.parent,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, f"{name} printed no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.parametrize("mode", ["in_process", "server"])
def test_surrogate_controls_serve_that_request_uncached_and_no_other(peaked_model, mode):
    """vLLM in-process, lmcache in it or on the host's lmcache server (server_url). Before
    the fix the first bad request raised out of vLLM's scheduler (update_state_after_alloc)
    and every later request failed with an AssertionError in vLLM's KV cache manager."""
    if mode == "server":
        pytest.importorskip("lmcache_server")
        from lmcache_server.testing import ServerProcess

        with ServerProcess(CACHE) as server:
            r = run_scenario("surrogate_controls", peaked_model, LMC_TEST_SERVER_URL=server.url)
    else:
        r = run_scenario("surrogate_controls", peaked_model)
    assert set(r["bad"]) == {"salt", "tag_value", "tag_name", "salt_and_tag"}
    for name, got in r["bad"].items():
        assert "error" not in got, f"{name}: {got.get('error')}"
        assert got["loaded"] == 0, f"{name}: a request lmcache cannot key loaded KV"
        assert got["same_output"], f"{name}: served without the cache, answered as a cold run"
    ok = r["ordinary"]
    assert "error" not in ok, ok.get("error")
    assert ok["again"] == r["cold"] and ok["loaded_again"] >= 512
    assert ok["q_hit"] == ok["q_cold"] and ok["loaded_q"] >= 512
    assert ok["tagged_hit"] == ok["tagged_cold"] and ok["loaded_tagged"] >= 512


def test_surrogate_controls_sent_to_vllms_openai_server_leave_it_serving(tiny_model, tmp_path):
    """vLLM's OpenAI server, its engine core in another process, lmcache in server mode: a
    client sends JSON's ``\\ud800`` escapes in ``cache_salt`` and ``kv_transfer_params``.
    vLLM may refuse such a request itself (its front end cannot pass a lone surrogate to
    the engine core: a 400 or a 500 for that request); one that is served loads nothing,
    and ordinary requests after them all run and hit."""
    pytest.importorskip("lmcache_server")
    from lmcache_server.testing import ServerProcess
    from lmcache_vllm.testing import complete, vllm_server

    bad = [
        {"cache_salt": "tenant-\ud83d"},
        {"kv_transfer_params": {"lmcache.tag.user": "\ud800"}},
        {"kv_transfer_params": {"lmcache.tag.\udfff": "alice"}},
        {"cache_salt": "t-\udfff", "kv_transfer_params": {"lmcache.tag.user": "alice"}},
    ]
    with ServerProcess(CACHE) as server:
        extra = {"server_url": server.url}
        log = tmp_path / "vllm.log"
        with vllm_server(tiny_model, "kv_both", vllm_env(), log, extra_config=extra) as port:
            first = complete(port, PROMPT, max_tokens=8)
            answers = {}
            for i, body in enumerate(bad):
                before = external_hits(port)
                try:
                    text = complete(port, PROMPT, max_tokens=8, **body)
                except urllib.error.HTTPError as e:
                    answers[i] = e.code
                    continue
                answers[i] = 200
                assert text == first
                assert external_hits(port) == before, f"{body}: loaded KV it cannot key"
            before = external_hits(port)
            again = [complete(port, PROMPT, max_tokens=8) for _ in range(3)]
            hits = external_hits(port) - before
            # The log while it serves: stopping the server (SIGTERM, then a kill) makes
            # vLLM's front end log EngineDeadError for the engine it just stopped.
            text = log.read_text()
    assert set(answers.values()) <= {200, 400, 500}, answers
    assert again == [first] * 3
    assert hits >= 3 * 512, "ordinary requests after the bad ones hit as before"
    assert "EngineDeadError" not in text and "AssertionError" not in text
