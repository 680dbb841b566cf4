"""Non-prefix reuse (blending) in real vLLM with a real model, float32 on the CPU.

The scenarios run in subprocesses (``blend_scenarios.py``), one engine each;
see there for what each step does. Scenarios that ask for the same engine
(the real model, blending's defaults) run in one, emptied between them, once
per module (:func:`default_engine`); a different model or setting gets its
own. The exact oracles: ratio 1 is a full prefill, a segment at offset 0 with
ratio 0 is prefix reuse, blocks hold recomputed KV at the selected tokens and
the cached KV re-rotated elsewhere.
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

SCENARIOS = Path(__file__).with_name("blend_scenarios.py")


class Results:
    """What one process of scenarios printed: each scenario's result, or why there is none."""

    def __init__(self, names: list[str], model) -> None:
        self.proc = subprocess.run(
            [sys.executable, str(SCENARIOS), ",".join(names), str(model)],
            capture_output=True,
            text=True,
            timeout=900 * len(names),
            cwd=SCENARIOS.parent,
            env={**os.environ},
        )
        self.results = {}
        for ln in self.proc.stdout.splitlines():
            if ln.startswith("RESULT "):
                name, result = ln[len("RESULT ") :].split(" ", 1)
                self.results[name] = json.loads(result)

    def __getitem__(self, name: str) -> dict:
        assert name in self.results, (
            f"scenario {name} printed no result (exit status {self.proc.returncode}):\n"
            f"{self.proc.stdout[-3000:]}{self.proc.stderr[-6000:]}"
        )
        return self.results[name]


def run(name: str, model) -> dict:
    return Results([name], model)[name]


@pytest.fixture(scope="module")
def default_engine(smollm2_model) -> Results:
    """The scenarios that use the same engine (the real model, blending's defaults, vLLM's
    prefix cache off), run in one process, in this order."""
    return Results(["oracles", "offset0_holes_faults"], smollm2_model)


def test_blend_oracles_in_real_vllm(default_engine):
    r = default_engine["oracles"]
    # (2) Ratio 1.0 recomputes everything: vLLM's own output and KV, to float rounding.
    assert r["ratio1_range"][0] == 0 and r["ratio1_range"][1] > 400
    assert r["ratio1_same_tokens"]
    assert r["ratio1_logprob_diff"] < 1e-4
    assert r["ratio1_kv_diff"] < 1e-3
    # (6) The KV error against a full prefill falls as the ratio rises.
    e = r["errors"]
    assert e["0.0"] > e["0.15"] > e["0.5"] > 0, e
    assert r["ratio15_same_answer"]
    # (4) Slots: cached KV re-rotated (K to the reference maths, V byte for byte) where
    # not recomputed; recomputed tokens hold other values; early layers are fresh.
    s = r["slots"]
    assert s["checked"] > 300 and s["max_k_err"] < 1e-3 and s["v_exact"], s
    assert s["recomputed_rows"] > 50 and s["recomputed_differ"] == s["recomputed_cached"] > 0, s
    assert s["early_layers_diff"] < 1e-3
    # (1) End to end: a document's stored layer-0 K, moved to its new place, is the full
    # prefill's K there (layer 0 depends on the token and its position only).
    assert r["layer0_stored_vs_full"] < 1e-3
    c = r["counters"]
    assert c["blend_requests"] == 4 and c["blend_reused_tokens"] > 1000


def test_offset_zero_is_prefix_reuse_and_holes_and_lost_chunks_are_recomputed(default_engine):
    r = default_engine["offset0_holes_faults"]
    # (3) One segment at offset 0, ratio 0: the layers after the check layer hold the
    # stored KV byte for byte, those up to it equal vLLM's to rounding; same output.
    assert r["offset0_range"][0] == 0 and r["offset0_range"][1] > 100
    assert r["offset0_same_tokens"] and r["offset0_later_layers_equal"]
    assert r["offset0_early_layers_diff"] < 1e-4
    # (5) A new document between cached ones is a hole: every token recomputed.
    assert r["hole_in_range"] and r["hole_tokens"] > 100
    assert r["hole_rows_recomputed"] == r["hole_tokens"]
    assert r["hole_ratio1_same_tokens"]
    assert not r["other_tenant_blended"]
    # Chunks lost between lookup and load: nothing reused, everything recomputed, same output.
    assert r["lost_reused"] == 0 and r["lost_same_tokens"]
    # A prompt without separators takes the prefix path.
    assert r["plain_stored"] > 0 and r["plain_blended"] == 0


def test_selection_adaptive_budget_and_guard_from_the_config(smollm2_model):
    """An operator's blend settings (blend_scenarios.GUARDED) in real vLLM: the adaptive
    budget recomputes what its target asks, the guard falls back to a full prefill, the
    question's attention ranks tokens, and the per-request deviation is exported."""
    r = run("guard_adaptive", smollm2_model)
    p = r["policy"]
    assert p["rankings"] == ["k_deviation", "question_attention"] and p["budget"] == "adaptive"
    assert p["target"] == 1e-4 and p["cap"] == 0.5 and p["max_deviation"] == 2e-4
    assert r["scheduler_sends_question"]
    c = r["configured"]
    assert c["deviation"] > 0 and c["deviation_observed"] == 1
    # The configured request: the target met, or the cap reached (and then the guard's call).
    assert c["residual"] <= 1e-4 + 1e-12 or c["share"] >= 0.5 - 0.02, c
    assert c["fallback"] == (c["residual"] > 2e-4) and c["fallbacks"] == int(c["fallback"])
    # The guard trips: everything recomputed, which is a full prefill, and counted.
    g = r["guard_trips"]
    assert g["fallback"] and g["fallbacks"] == 1 and g["reused"] == 0
    assert g["same_tokens"] and g["kv_diff"] < 1e-3
    assert not r["guard_off"]["fallback"] and r["guard_off"]["fallbacks"] == 0
    gg, gn = r["guard_trips_gradual"], r["gradual_no_guard"]
    assert gg["fallback"] and gg["reused"] == 0 and gg["same_tokens"] and gg["kv_diff"] < 1e-3
    assert not gn["fallback"] and gn["reused"] > 100  # the same settings without the guard
    # Adaptive: target 0 recomputes everything (= full prefill); a huge target only the
    # holes (= ratio 0); tighter targets recompute more and leave at most the target.
    assert r["target0"]["reused"] == 0 and r["target0"]["same_tokens"]
    assert r["target_huge"]["recomputed"] == r["fixed0"]["recomputed"]
    assert r["target_huge"]["reused"] > 100
    t = r["targets"]
    shares = [t[k]["share"] for k in ("0.0003", "0.0001", "3e-05", "1e-05")]
    assert shares == sorted(shares) and shares[-1] > shares[0], shares
    for k, v in t.items():
        assert v["residual"] <= float(k) * (1 + 1e-6) + 1e-12, (k, v)
    # The question's attention ranks tokens differently from K deviation, and the question
    # riding along up to the check layer leaves the range's early layers exact.
    qa15, k15 = r["fixed15_question"], r["fixed15_k"]
    assert qa15["recomputed"] == k15["recomputed"] and qa15["rows"] != k15["rows"]
    assert qa15["early_kv_diff"] < 1e-4 and k15["early_kv_diff"] < 1e-4


def test_blending_with_vllms_prefix_cache_on(smollm2_model):
    r = run("prefix_cache_on", smollm2_model)
    assert r["start"] == 128 and r["held_blocks"] == 1  # vLLM held the first block
    assert r["held_untouched"]  # shared blocks are never written
    assert r["same_tokens"]  # ratio 1 from there on is still a full prefill
    assert r["ratio15_start"] == 128 and r["ratio15_same_answer"]


def test_reordered_documents_are_reused_in_a_real_server(smollm2_model, tmp_path):
    """(7) vLLM's OpenAI server (worker in its own process: lookups over the socket):
    documents stored in one order are reused in another, and the answers hold up."""
    from lmcache_core.bench.scrape import scrape_metrics
    from lmcache_core.testing.servers import free_port
    from lmcache_vllm.testing import complete, vllm_server
    from lmcache_vllm.testing import qa_sets as qa

    metrics = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "1GiB",
        "LMCACHE_METRICS_PORT": str(metrics),
        "LMCACHE_SOCKET_DIR": str(tmp_path),
    }
    items = qa.make_items(6, doc_tokens=80, seed=17)
    answers = []
    with vllm_server(
        smollm2_model,
        "kv_both",
        env,
        tmp_path / "vllm.log",
        "float32",
        extra_config={"enable_blending": True, "blend_min_tokens": 64},
    ) as port:
        url = f"http://127.0.0.1:{metrics}/metrics"
        for i, it in enumerate(items):
            complete(port, qa.warm_prompt(it), 4)  # stores the documents, other order
            full = complete(port, qa.render(it), 8, cache_salt=f"full-{i}")
            before = scrape_metrics(url).get("lmcache:blend_reused_tokens", 0)
            blended = complete(port, qa.render(it), 8)
            reused = scrape_metrics(url).get("lmcache:blend_reused_tokens", 0) - before
            answers.append((it, full, blended, reused))
        m = scrape_metrics(url)
    # Every reordered prompt was blended, reusing most of its documents' tokens.
    assert m.get("lmcache:blend_requests", 0) == len(items)
    assert all(reused > 200 for *_, reused in answers), [a[3] for a in answers]
    # The answers: the full prefill's, and right.
    same = sum(
        full.strip().split(".")[0] == blended.strip().split(".")[0]
        for _, full, blended, _ in answers
    )
    right = sum(qa.is_correct(it, blended) for it, _, blended, _ in answers)
    right_full = sum(qa.is_correct(it, full) for it, full, _, _ in answers)
    assert same >= len(items) - 1, answers
    assert right >= right_full - 1, answers


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral"])
def test_every_supported_family_blends(family_model, family):
    """Qwen2 (biased projections), Qwen3 (per-head q/k norms) and Mistral run the same pass."""
    r = run("family", family_model(family))
    assert r["arch"].lower().startswith(family)
    assert r["ratio1_blended"] and r["ratio1_same_tokens"]
    assert r["reused"] > 300


def test_a_model_without_rope_is_refused_at_start(family_model):
    r = run("unsupported", family_model("gpt2"))
    assert r["error"] is not None and "enable_blending" in r["error"]
    assert "Qwen3ForCausalLM" in r["error"] and "turn enable_blending off" in r["error"]
