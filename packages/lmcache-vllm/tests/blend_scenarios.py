"""Blending in a real vLLM engine (in-process, on the CPU, float32), one engine per process.

``python blend_scenarios.py SCENARIO[,SCENARIO...] MODEL_DIR`` runs the
scenarios in order in one engine and prints one line ``RESULT SCENARIO {json}``
for each (a scenario that raises prints its traceback and no result; the
others still run). Scenarios run together must ask for the same engine (the
same ``make_llm`` arguments); before each one after the first, the engine is
emptied as a new one would be: nothing in lmcache's tiers, nothing in vLLM's
prefix cache, blending's ratios back to the configured ones, counters read from
the scenario's start. The real model (SmolLM2-135M) makes the oracles
meaningful: a blend that equals a full prefill must equal it on real text,
token for token and in every KV byte vLLM holds.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "1GiB")

from lmcache_vllm.testing import qa_sets as qa

BLEND = {"enable_blending": True, "blend_min_tokens": 32}


#: The engine this process runs (scenarios run together share it): (its arguments, LLM,
#: blending's configured ratios).
_ENGINE: tuple[str, object, tuple] | None = None


def make_llm(model: str, prefix_caching: bool = False, **extra):
    """The process's engine: made by the first scenario, handed, emptied, to the next."""
    global _ENGINE
    from vllm import LLM

    args = {
        "model": model,
        "enforce_eager": True,
        "max_model_len": 4096,
        "dtype": "float32",
        "seed": 0,
        "max_num_batched_tokens": 4096,
        "enable_prefix_caching": prefix_caching,
        "kv_transfer_config": {
            "kv_connector": "LMCacheKVConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "lmcache_vllm",
            "kv_connector_extra_config": {**BLEND, **extra},
        },
    }
    key = json.dumps(args, sort_keys=True)
    if _ENGINE is None:
        from lmcache_vllm.connector import WORKERS

        llm = LLM(**args)
        _ENGINE = (key, llm, tuple(WORKERS[0].blend.ratios))
        return llm
    made, llm, ratios = _ENGINE
    if key != made:
        raise RuntimeError(f"one engine per process: this scenario asks for {key}, not {made}")
    _empty(llm, ratios)
    return llm


def _empty(llm, ratios: tuple) -> None:
    """What the next scenario would find in a new engine: no KV in lmcache or in vLLM."""
    from lmcache_core.chunk_aliases import ChunkAliases
    from lmcache_vllm.connector import WORKERS

    (worker,) = WORKERS
    engine = worker.engine
    assert engine.flush(60)
    engine.chunk_store.remove([k for t in engine.tiers for k in t.keys()])
    assert not any(list(t.keys()) for t in engine.tiers)
    engine.chunk_store.aliases = ChunkAliases()
    llm.reset_prefix_cache()
    worker.blend.ratios = ratios
    worker.recent.clear()


class Blend:
    def __init__(self, llm):
        from lmcache_vllm.connector import WORKERS

        self.llm = llm
        (self.worker,) = WORKERS
        self.blend = self.worker.blend
        self.m = self.worker.engine.metrics
        self.tok = llm.get_tokenizer()
        self._start = self._counts()  # counters from the scenario's start

    def gen(self, prompt, salt=None, segments=None, n=12):
        """Greedy output ids and each step's logprob; the KV vLLM held for the prompt."""
        from vllm import SamplingParams

        extra = {"kv_transfer_params": {"blend_segments": segments}} if segments else None
        sp = SamplingParams(max_tokens=n, temperature=0, logprobs=1, extra_args=extra)
        p = {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
        if salt:
            p["cache_salt"] = salt
        self.worker.recent.clear()
        out = self.llm.generate(p, sp, use_tqdm=False)[0]
        o = out.outputs[0]
        ids = list(o.token_ids)
        lps = [step[t].logprob for step, t in zip(o.logprobs, ids)]
        # The request's blocks are freed but untouched until the next request.
        blocks = [r[2] for r in self.worker.recent if r[2]]
        kv = None
        if blocks:
            kv = self.blend.read_tokens(blocks[-1], 0, len(out.prompt_token_ids) - 1).clone()
        return ids, lps, kv, out

    def last_blend(self, out):
        """The blend of the latest request: ("blend", req_id, block_ids, (start, until))."""
        r = [r for r in self.worker.recent if r[0] == "blend"]
        return r[-1] if r else None

    def _counts(self):
        names = ("blend_requests", "blend_reused_tokens", "blend_recomputed_tokens")
        return {n: self.m.get(f"lmcache:{n}") for n in names}

    def counters(self):
        """Blending's counters since the scenario started."""
        return {n: v - self._start[n] for n, v in self._counts().items()}


def _err(a, b, layers):
    """Mean |a - b| of KV over ``layers`` (a range of layer indices)."""
    return float((a[layers] - b[layers]).abs().mean())


def scenario_oracles(model: str) -> dict:
    """Ratio 1 = full prefill; error falls with the ratio; blocks hold what they must."""
    import numpy as np
    import torch
    from lmcache_core.blend import rope
    from lmcache_core.keys import CacheKey

    h = Blend(make_llm(model))
    r: dict = {}
    item = qa.make_items(1, docs=(4, 4), doc_tokens=120, seed=3)[0]
    warm, prompt = qa.warm_prompt(item), qa.render(item)
    h.gen(warm)  # stores the documents in another order
    ref_ids, ref_lp, ref_kv, _ = h.gen(prompt, salt="full-prefill")
    n_layers, check = ref_kv.shape[0], h.blend.check_layers[-1]
    after = slice(check + 1, n_layers)

    # (2) ratio 1.0: the blend is a full prefill, in outputs and in every KV value.
    h.blend.ratios = (1.0,)
    ids, lp, kv, out = h.gen(prompt)
    blend = h.last_blend(out)
    r["ratio1_range"] = list(blend[3])
    until = blend[3][1]
    r["ratio1_same_tokens"] = ids == ref_ids
    r["ratio1_logprob_diff"] = max(abs(a - b) for a, b in zip(lp, ref_lp))
    r["ratio1_kv_diff"] = float((kv[:, :, :until] - ref_kv[:, :, :until]).abs().max())

    # (6) the error against a full prefill falls as the ratio rises.
    r["errors"] = {}
    for ratio in (0.0, 0.15, 0.5):
        h.blend.ratios = (ratio,)
        ids, lp, kv, out = h.gen(prompt)
        r["errors"][str(ratio)] = _err(kv[:, :, :until], ref_kv[:, :, :until], after)
        if ratio == 0.15:
            kv15, res15 = kv, h.blend.last
            r["ratio15_same_answer"] = (
                h.tok.decode(ids).split(".")[0] == h.tok.decode(ref_ids).split(".")[0]
            )

    # (4) after a 0.15 blend, blocks hold recomputed KV at the selected tokens and the
    # cached KV, re-rotated, elsewhere; layers up to the check layer are fresh everywhere.
    tokens = h.tok(prompt, add_special_tokens=False)["input_ids"]
    bs = h.blend
    rows = set(res15.rows.tolist())
    freqs = 1.0 / (100000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    segs = h_segments(h, tokens)
    max_k_err, v_exact, recomputed_differ, recomputed_cached, checked = 0.0, True, 0, 0, 0
    for seg in segs:
        prompt_seg = bs.engine.chunker.chunk(
            tokens[seg.start : seg.end], include_partial=True, partial_multiple=1
        )
        keys = [CacheKey(bs.namespace.digest + d) for d in prompt_seg.digests]
        got = bs.engine.cpu.get(keys)
        if not got or got[0] is None or seg.start >= until:
            continue
        for ci, c in enumerate(got):
            if c is None:
                continue
            raw = torch.frombuffer(bytearray(c.view), dtype=torch.float32).view(
                n_layers, 2, c.num_tokens, *kv15.shape[3:]
            )
            c.release()
            lo = seg.start + ci * bs.engine.config.chunk_size
            for j in range(c.num_tokens):
                pos = lo + j
                if pos >= until:
                    break
                stored_k = raw[after, 0, j].double().numpy()  # [layers, heads, dim]
                want_k = rope.shift(stored_k, seg.start, freqs)
                if pos in rows:
                    recomputed_cached += 1
                    recomputed_differ += int(not torch.equal(kv15[after, 1, pos], raw[after, 1, j]))
                    continue
                checked += 1
                max_k_err = max(
                    max_k_err, float(np.abs(kv15[after, 0, pos].numpy() - want_k).max())
                )
                v_exact &= torch.equal(kv15[after, 1, pos], raw[after, 1, j])
    r["slots"] = {
        "checked": checked,
        "max_k_err": max_k_err,
        "v_exact": bool(v_exact),
        "recomputed_rows": len(rows),
        "recomputed_differ": recomputed_differ,
        "recomputed_cached": recomputed_cached,
        "early_layers_diff": float(
            (kv15[: check + 1, :, :until] - ref_kv[: check + 1, :, :until]).abs().max()
        ),
    }

    # (1) end to end: layer 0's K depends on the token and its position only, so a
    # document's K stored in the warm order and moved to its new place is the full
    # prefill's K there.
    worst = 0.0
    for seg in segs:
        if seg.start >= until:
            continue
        d = bs.engine.chunker.chunk(tokens[seg.start : seg.end], include_partial=True).digests
        got = bs.engine.cpu.get([CacheKey(bs.namespace.digest + d[0])])
        if got[0] is None:
            continue
        c = got[0]
        raw = torch.frombuffer(bytearray(c.view), dtype=torch.float32).view(
            n_layers, 2, c.num_tokens, *kv15.shape[3:]
        )
        c.release()
        n = min(c.num_tokens, until - seg.start)
        moved = rope.shift(raw[0, 0, :n].double().numpy(), seg.start, freqs)
        worst = max(
            worst, float(np.abs(moved - ref_kv[0, 0, seg.start : seg.start + n].numpy()).max())
        )
    r["layer0_stored_vs_full"] = worst
    r["counters"] = h.counters()
    return r


def h_segments(h: Blend, tokens: list[int]):
    from lmcache_core.blend import segments_from_text

    text = h.tok.decode(tokens)
    enc = h.tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return segments_from_text(text, enc["offset_mapping"], qa.SEPARATOR)


def scenario_offset0_holes_faults(model: str) -> dict:
    """Ratio 0 at offset 0 is prefix reuse; holes and lost chunks are recomputed."""
    h = Blend(make_llm(model))
    r: dict = {}
    items = qa.make_items(2, docs=(4, 4), doc_tokens=120, seed=5)
    doc = h.tok(items[0]["docs"][0], add_special_tokens=False)["input_ids"]
    q1 = h.tok(" Question: who is it about?", add_special_tokens=False)["input_ids"]
    q2 = h.tok(" Question: where does it happen?", add_special_tokens=False)["input_ids"]
    n = len(doc)
    # (3) one segment at offset 0, explicit spans: stored by one request, reused by the next.
    h.gen(doc + q1, segments=[[0, n], [n, n + len(q1)]])
    ref_ids, _, ref_kv, _ = h.gen(doc + q2, salt="full", segments=[[0, n], [n, n + len(q2)]])
    h.blend.ratios = (0.0,)
    ids, _, kv, out = h.gen(doc + q2, segments=[[0, n], [n, n + len(q2)]])
    blend = h.last_blend(out)
    check = h.blend.check_layers[-1]
    r["offset0_range"] = list(blend[3])
    r["offset0_same_tokens"] = ids == ref_ids
    r["offset0_later_layers_equal"] = bool(
        torch_equal(kv[check + 1 :, :, :n], ref_kv[check + 1 :, :, :n])
    )
    r["offset0_early_layers_diff"] = float(
        (kv[: check + 1, :, :n] - ref_kv[: check + 1, :, :n]).abs().max()
    )

    # (5) a hole: a new document between cached ones is recomputed in every layer.
    it = items[1]
    h.gen(qa.warm_prompt(it))
    new_doc = items[0]["docs"][1]
    order = it["order"]
    docs = [it["docs"][i] for i in order]
    with_hole = qa.render({**it, "docs": docs[:2] + [new_doc] + docs[2:], "order": list(range(5))})
    ref_ids, _, _, _ = h.gen(with_hole, salt="full-hole")
    tokens = h.tok(with_hole, add_special_tokens=False)["input_ids"]
    hole = h_segments(h, tokens)[3]  # instruction, doc, doc, the new doc, ...
    h.blend.ratios = (0.15,)
    ids, _, _, out = h.gen(with_hole)  # (this stores the new document)
    blend = h.last_blend(out)
    rows = set((h.blend.last.rows + blend[3][0]).tolist())
    r["hole_tokens"] = hole.num_tokens
    r["hole_rows_recomputed"] = sum(p in rows for p in range(hole.start, hole.end))
    r["hole_in_range"] = blend[3][0] <= hole.start and hole.end <= blend[3][1]
    h.blend.ratios = (1.0,)
    ids, _, _, out = h.gen(with_hole, salt="another-tenant")  # the hole again: uncached
    r["other_tenant_blended"] = h.last_blend(out) is not None  # a salt shares nothing
    h.gen(qa.warm_prompt(it), salt="another-tenant")
    new_doc2 = items[0]["docs"][2]
    with_hole2 = qa.render(
        {**it, "docs": docs[:2] + [new_doc2] + docs[2:], "order": list(range(5))}
    )
    ref2, _, _, _ = h.gen(with_hole2, salt="full-hole-2")
    ids, _, _, out = h.gen(with_hole2, salt="another-tenant")
    r["hole_ratio1_same_tokens"] = ids == ref2 and h.last_blend(out) is not None

    # A chunk lost between lookup and load (a tier failing): its tokens become holes.
    engine = h.blend.engine
    real = engine.retrieve_chunks
    engine.retrieve_chunks = lambda keys, spans, writer: 0  # every tier misses
    try:
        h.blend.ratios = (0.0,)
        before = h.counters()
        ids, _, _, out = h.gen(with_hole)
        after = h.counters()
    finally:
        engine.retrieve_chunks = real
    r["lost_same_tokens"] = ids == ref_ids
    r["lost_reused"] = after["blend_reused_tokens"] - before["blend_reused_tokens"]

    # Without separators a request takes the prefix path, unchanged.
    plain = h.tok(items[1]["docs"][2] * 3, add_special_tokens=False)["input_ids"][:600]
    stored = engine.metrics.get("lmcache:num_stored_tokens")
    blends = h.counters()["blend_requests"]
    h.gen(plain)
    r["plain_stored"] = engine.metrics.get("lmcache:num_stored_tokens") - stored
    r["plain_blended"] = h.counters()["blend_requests"] - blends
    return r


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def scenario_prefix_cache_on(model: str) -> dict:
    """vLLM's prefix cache holds the first blocks: the blend starts after them, never
    writes them, and ratio 1 still equals a full prefill."""
    import torch

    h = Blend(make_llm(model, prefix_caching=True))
    r: dict = {}
    it = qa.make_items(1, docs=(4, 4), doc_tokens=200, seed=7)[0]
    first = qa.render(it, it["warm_order"], "Who is mentioned first?")
    # The same first document (and instruction) as the warm prompt: vLLM holds that prefix.
    order = [it["warm_order"][0]] + [i for i in it["order"] if i != it["warm_order"][0]]
    second = qa.render(it, order)
    h.gen(first)
    ref_ids, _, _, _ = h.gen(second, salt="full")
    h.blend.ratios = (1.0,)
    layers = h.worker.layers
    snapshot = [t.clone() for t in layers]
    ids, _, _, out = h.gen(second)
    blend = h.last_blend(out)
    start = blend[3][0]
    r["start"] = start
    r["same_tokens"] = ids == ref_ids
    # The blocks vLLM already held (shared with the first request) were not written.
    tokens = out.prompt_token_ids
    held = blend[2][: start // h.worker.block_size]
    r["held_blocks"] = len(held)
    r["held_untouched"] = all(
        torch.equal(t[b], s[b]) for t, s in zip(layers, snapshot) for b in held
    )
    # Another order after the same first document: vLLM holds the first block again.
    rest = order[1:]
    third = qa.render(it, [order[0], *rest[1:], rest[0]])
    ref3, _, _, _ = h.gen(third, salt="full-3")
    h.blend.ratios = (0.15,)
    ids3, _, _, out = h.gen(third)
    blend3 = h.last_blend(out)
    r["ratio15_start"] = blend3[3][0] if blend3 else None
    r["ratio15_same_answer"] = h.tok.decode(ids3).split(".")[0] == h.tok.decode(ref3).split(".")[0]
    r["prompt_tokens"] = len(tokens)
    return r


def _tokens(seed: int, n: int) -> list[int]:
    import random

    rnd = random.Random(seed)
    return [rnd.randrange(2, 4000) for _ in range(n)]


def _spans(parts: list[list[int]]) -> list[list[int]]:
    out, pos = [], 0
    for p in parts:
        out.append([pos, pos + len(p)])
        pos += len(p)
    return out


def scenario_family(model: str) -> dict:
    """Another decoder family (a random model): ratio 1 is a full prefill, 0.15 reuses."""
    h = Blend(make_llm(model))
    docs = [_tokens(i, 150) for i in range(3)]
    q1, q2, q3 = _tokens(10, 20), _tokens(11, 20), _tokens(12, 20)
    warm = [docs[0], docs[1], docs[2], q1]
    h.gen([t for p in warm for t in p], segments=_spans(warm))
    parts = [docs[2], docs[0], docs[1], q2]
    prompt, spans = [t for p in parts for t in p], _spans(parts)
    ref, _, _, _ = h.gen(prompt, salt="full", segments=spans)
    h.blend.ratios = (1.0,)
    ids, _, _, out = h.gen(prompt, segments=spans)
    r = {"ratio1_same_tokens": ids == ref, "ratio1_blended": h.last_blend(out) is not None}
    h.blend.ratios = (0.15,)
    parts = [docs[1], docs[2], docs[0], q3]
    before = h.counters()
    h.gen([t for p in parts for t in p], segments=_spans(parts))
    r["reused"] = h.counters()["blend_reused_tokens"] - before["blend_reused_tokens"]
    r["arch"] = type(h.blend.model.inner).__name__
    return r


#: An operator's settings: an adaptive budget ranked by K deviation and the question's
#: attention, capped at half the tokens, with the guard on.
GUARDED = {
    "blend_selection": "k_deviation+question_attention",
    "blend_budget": "adaptive",
    "blend_deviation_target": 1e-4,
    "blend_adaptive_max_ratio": 0.5,
    "blend_max_deviation": 2e-4,
}


def scenario_guard_adaptive(model: str) -> dict:
    """The config's selection, adaptive budget and guard, in a real engine."""
    import dataclasses

    from lmcache_vllm.connector import SCHEDULERS

    h = Blend(make_llm(model, **GUARDED))
    r: dict = {}
    item = qa.make_shared_items(1, seed=5)[0]
    warm, prompt = qa.warm_prompt(item), qa.render(item)
    h.gen(warm)
    ref_ids, _, ref_kv, _ = h.gen(prompt, salt="full-prefill")
    configured = h.blend.policy
    r["policy"] = dataclasses.asdict(configured)
    r["scheduler_sends_question"] = SCHEDULERS[0].blend.wants_question

    def blend(**change) -> dict:
        h.blend.policy = dataclasses.replace(configured, **change)
        before = {n: h.m.get(f"lmcache:{n}") for n in ("blend_deviation", "blend_fallbacks")}
        ids, _, kv, out = h.gen(prompt)
        res = h.blend.last
        until = h.last_blend(out)[3][1]
        n = res.recomputed + res.reused
        return {
            "recomputed": res.recomputed,
            "reused": res.reused,
            "share": res.recomputed / n,
            "deviation": res.deviation,
            "residual": res.residual,
            "fallback": res.fallback,
            "rows": res.rows.tolist(),
            "same_tokens": ids == ref_ids,
            "kv_diff": float((kv[:, :, :until] - ref_kv[:, :, :until]).abs().max()),
            "early_kv_diff": float((kv[:2, :, :until] - ref_kv[:2, :, :until]).abs().max()),
            "deviation_observed": h.m.get("lmcache:blend_deviation") - before["blend_deviation"],
            "fallbacks": h.m.get("lmcache:blend_fallbacks") - before["blend_fallbacks"],
        }

    r["configured"] = blend()
    r["guard_trips"] = blend(max_deviation=1e-12)
    r["guard_off"] = blend(max_deviation=0.0)
    # Gradual filtering: once the guard trips at the first check layer, the later ones
    # select nothing away.
    h.blend.check_layers, h.blend.ratios = (1, 2), (0.5, 0.25)
    r["guard_trips_gradual"] = blend(max_deviation=1e-12, budget="fixed")
    r["gradual_no_guard"] = blend(max_deviation=0.0, budget="fixed")
    h.blend.check_layers, h.blend.ratios = (1,), (0.4,)
    r["target0"] = blend(max_deviation=0.0, target=0.0, cap=1.0)
    r["target_huge"] = blend(max_deviation=0.0, target=10.0)
    h.blend.ratios = (0.15,)
    r["fixed15_k"] = blend(max_deviation=0.0, budget="fixed", rankings=("k_deviation",))
    r["fixed15_question"] = blend(
        max_deviation=0.0, budget="fixed", rankings=("question_attention",)
    )
    h.blend.ratios = (0.0,)
    r["fixed0"] = blend(max_deviation=0.0, budget="fixed", rankings=("k_deviation",))
    r["targets"] = {
        str(t): blend(max_deviation=0.0, target=t, cap=1.0) for t in (3e-4, 1e-4, 3e-5, 1e-5)
    }
    return r


def scenario_unsupported(model: str) -> dict:
    try:
        make_llm(model)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


if __name__ == "__main__":
    import traceback

    names, model = sys.argv[1].split(","), sys.argv[2]
    failed = False
    for name in names:
        try:
            result = globals()[f"scenario_{name}"](model)
        except Exception:
            print(f"scenario {name} failed:", file=sys.stderr)
            traceback.print_exc()
            sys.stderr.flush()
            failed = True
            continue
        print(f"RESULT {name} " + json.dumps(result), flush=True)
    os._exit(1 if failed else 0)  # skip vLLM's slow teardown
