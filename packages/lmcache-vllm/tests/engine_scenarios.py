"""Scenarios run in a real vLLM engine (in-process, on the CPU), one per subprocess.

``python engine_scenarios.py SCENARIO MODEL_DIR`` prints one line
``RESULT {json}`` for the test to check. Running each engine in its own
process keeps vLLM's global state out of pytest's process.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("LMCACHE_MAX_LOCAL_CPU_SIZE", "512MiB")


def make_llm(model: str, llm_kw: dict | None = None, **kw):
    from vllm import LLM

    args = {
        "model": model,
        "enforce_eager": True,
        "max_model_len": 4096,
        "dtype": os.environ.get("LMC_TEST_DTYPE", "bfloat16"),
        "seed": 0,
        "max_num_batched_tokens": 2048,
        "enable_prefix_caching": True,
        **(llm_kw or {}),
    }
    if os.environ.get("LMC_TEST_HF_OVERRIDES"):  # a deployment that changes the model's config
        args["hf_overrides"] = json.loads(os.environ["LMC_TEST_HF_OVERRIDES"])
    return LLM(
        **args,
        kv_transfer_config={
            "kv_connector": "LMCacheKVConnector",
            "kv_role": "kv_both",
            "kv_connector_module_path": "lmcache_vllm",
            **kw,
        },
    )


class Harness:
    def __init__(self, llm):
        from lmcache_vllm.connector import WORKERS
        from vllm import SamplingParams

        self.llm = llm
        self.sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
        (self.worker,) = WORKERS
        self.engine = self.worker.engine
        self.m = self.engine.metrics

    def gen(self, tokens, lora=None, salt=None):
        prompt = {"prompt_token_ids": tokens}
        if salt is not None:
            prompt["cache_salt"] = salt
        out = self.llm.generate(prompt, self.sp, use_tqdm=False, lora_request=lora)
        return list(out[0].outputs[0].token_ids)

    def gen_logprobs(self, tokens):
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)
        o = self.llm.generate({"prompt_token_ids": tokens}, sp, use_tqdm=False)[0].outputs[0]
        ids = list(o.token_ids)
        return ids, [step[t].logprob for step, t in zip(o.logprobs, ids)]

    def last(self, kind):
        return [r for r in self.worker.recent if r[0] == kind][-1]

    def kv_bytes(self, block_ids, lo, hi):
        from lmcache_core.transfer import ChunkIO
        from lmcache_cuda.reference import TorchPagedKV

        # The pure-torch reference reads vLLM's tensors (on any device, in any of
        # its layouts) independently of the kernels.
        buf = bytearray(self.engine.layout.chunk_bytes(hi - lo))
        kv = TorchPagedKV(self.engine.layout, self.worker.layers, block_ids)
        kv.read_chunks([ChunkIO(lo, hi, memoryview(buf))])
        return bytes(buf)

    def stored_chunk(self, tokens, i):
        keys = self.engine.chunk(tokens).keys(self.engine.namespace)
        (c,) = self.engine.cpu.get([keys[i]])
        try:
            return c, bytes(c.view)
        finally:
            c.release()

    def retrieved(self):
        return self.m.get("lmcache:num_hit_tokens")


def tokens(seed: int, n: int, vocab: int = 4000) -> list[int]:
    import random

    rnd = random.Random(seed)
    return [rnd.randrange(2, vocab) for _ in range(n)]


def scenario_random(model: str) -> dict:
    """Same split, byte-exact KV, shared prefixes, counters (random-weight model)."""
    return _random(Harness(make_llm(model)))


def scenario_layerwise(model: str) -> dict:
    """The same with use_layerwise: each layer copied at vLLM's per-layer hooks."""
    h = Harness(make_llm(model, kv_connector_extra_config={"use_layerwise": True}))
    calls = {"wait_for_layer_load": 0, "save_kv_layer": 0, "layers_written": 0, "layers_read": 0}
    worker = h.worker

    def count(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            calls["layers_written"] += sum(1 for w in worker._step_writers if w.ios)
            calls["layers_read"] += sum(1 for r in worker._step_readers if r.ios)
            return fn(*a, **k)

        return wrapped

    worker.wait_for_layer_load = count("wait_for_layer_load", worker.wait_for_layer_load)
    worker.save_kv_layer = count("save_kv_layer", worker.save_kv_layer)
    r = _random(h)
    r.update(calls, layerwise=worker.layerwise, held_loads=len(worker._held_loads))
    r["num_layers"] = len(worker.layers)
    return r


def _random(h: Harness) -> dict:
    r = {}
    p1 = tokens(1, 513)
    r["cold"] = h.gen(p1)
    _, _, blocks1, _ = h.last("save")
    computed = [h.kv_bytes(blocks1, 0, 256), h.kv_bytes(blocks1, 256, 512)]
    r["stored_equals_computed"] = [h.stored_chunk(p1, i)[1] == computed[i] for i in (0, 1)]
    before = h.retrieved()
    r["vllm_hit"] = h.gen(p1)  # vLLM's own prefix cache: 512 tokens
    r["loaded_on_vllm_hit"] = h.retrieved() - before
    h.llm.reset_prefix_cache()
    for t in h.worker.layers:  # whatever blocks the hit uses, only a load can refill them
        t.zero_()
    before = h.retrieved()
    r["lmcache_hit"] = h.gen(p1)  # lmcache: the same 512 tokens
    r["loaded_on_lmcache_hit"] = h.retrieved() - before
    _, _, blocks2, load_range = h.last("load")
    r["load_range"] = list(load_range)
    r["loaded_equals_computed"] = [
        h.kv_bytes(blocks2, 0, 256) == computed[0],
        h.kv_bytes(blocks2, 256, 512) == computed[1],
    ]
    r["zeroed_before_load"] = True
    r["different_blocks"] = set(blocks1[:4]).isdisjoint(blocks2[:4])
    # A prompt that shares only the first 300 tokens hits only the first chunk.
    h.llm.reset_prefix_cache()
    before = h.retrieved()
    h.gen(p1[:300] + tokens(2, 300))
    r["loaded_on_shared_prefix"] = h.retrieved() - before
    _next_round(h, r)
    _inside_a_chunk(h, r)
    r["hit_tokens_total"] = h.m.get("lmcache:num_lookup_hits")
    r["lookups"] = h.m.get("lmcache:num_lookup_requests")
    r["transfer"] = type(h.worker.kv([0])).__name__
    r["block_size"] = h.worker.block_size
    return r


def _next_round(h: Harness, r: dict) -> None:
    """A chat's next round repeats the last prompt and goes on: the last round's stored
    tail chunk (1 chunk + 128 tokens, whole blocks on the CPU and on GPUs) loads too."""
    round1 = tokens(3, 384)
    round2 = round1 + tokens(4, 300)
    # The reference: the same split (384 cached, 300 computed) from vLLM's own prefix
    # cache, under a salt so that none of it is lmcache's.
    h.gen(round1, salt="reference")
    r["round2_reference"] = h.gen(round2, salt="reference")
    h.gen(round1)
    _, _, blocks1, _ = h.last("save")
    computed = h.kv_bytes(blocks1, 0, 384)
    h.llm.reset_prefix_cache()
    for t in h.worker.layers:
        t.zero_()
    before = h.retrieved()
    r["round2"] = h.gen(round2)
    r["loaded_on_round2"] = h.retrieved() - before
    _, _, blocks2, load_range = h.last("load")
    r["round2_load_range"] = list(load_range)
    r["round2_loaded_equals_round1"] = h.kv_bytes(blocks2, 0, 384) == computed


def _inside_a_chunk(h: Harness, r: dict) -> None:
    """A prompt that shares a stored prompt's first 400 tokens, then goes on otherwise,
    loads the whole blocks of them: chunk 0 and the first blocks of the stored chunk 1."""
    stored = tokens(5, 700)
    other = stored[:400] + tokens(6, 200)
    # The reference: vLLM's own prefix cache, whole blocks too, the same split.
    h.gen(stored, salt="reference-inside")
    r["inside_reference"] = h.gen(other, salt="reference-inside")
    h.gen(stored)
    _, _, blocks1, _ = h.last("save")
    bs = h.worker.block_size
    shared = 256 + ((400 - 256) // bs) * bs
    computed = h.kv_bytes(blocks1, 0, shared)
    h.llm.reset_prefix_cache()
    for t in h.worker.layers:
        t.zero_()
    before = h.retrieved()
    cuts = h.m.get("lmcache:num_partial_chunk_loads")
    found = h.m.get("lmcache:num_lookup_hits")
    r["inside"] = h.gen(other)
    r["inside_lookup_hits"] = h.m.get("lmcache:num_lookup_hits") - found
    r["loaded_inside"] = h.retrieved() - before
    r["inside_expected"] = shared
    r["inside_cuts"] = h.m.get("lmcache:num_partial_chunk_loads") - cuts
    _, _, blocks2, load_range = h.last("load")
    r["inside_load_range"] = list(load_range)
    r["inside_loaded_equals_stored"] = h.kv_bytes(blocks2, 0, shared) == computed
    # An instance that did not store the chunk (here this one, its aliases forgotten, as
    # after a restart) misses its first blocks, until a request loads the chunk whole.
    from lmcache_core.chunk_aliases import ChunkAliases
    from lmcache_vllm.scheduler_side import SCHEDULERS

    h.engine.chunk_store.aliases = ChunkAliases()
    for side in SCHEDULERS:
        side.inner_keys._sent.clear()

    def loaded(prompt):
        h.llm.reset_prefix_cache()
        before = h.retrieved()
        h.gen(prompt)
        return h.retrieved() - before

    r["forgotten_loaded"] = loaded(stored[:400] + tokens(7, 200))
    r["whole_loaded"] = loaded(stored)  # learns the keys of its chunks' first blocks
    r["learnt_loaded"] = loaded(stored[:400] + tokens(8, 200))


def _logprob_gap(a, b) -> float:
    """Largest difference between two runs' logprobs of their chosen tokens."""
    # Equal values (-inf for a token the model rules out, too) differ by 0, never NaN.
    return max(0.0 if x == y else abs(x - y) for x, y in zip(a, b))


def scenario_recompute(model: str) -> dict:
    """A hit against a full recompute, a corrupted chunk, and the oracle's sensitivity.

    Random models have near-tied logits, so besides the greedy tokens the test
    compares the logprobs of the chosen tokens: a hit must match the
    recompute closely, and loading wrong bytes must move them far.
    """
    h = Harness(make_llm(model))
    r = {}
    p = tokens(3, 1100)
    r["cold"], cold_lp = h.gen_logprobs(p)
    h.llm.reset_prefix_cache()
    before = h.retrieved()
    r["hit"], hit_lp = h.gen_logprobs(p)
    r["hit_logprob_gap"] = _logprob_gap(cold_lp, hit_lp)
    r["loaded_on_hit"] = h.retrieved() - before
    # Overwrite the third chunk in DRAM: the checksum catches it, the load comes
    # up short, vLLM recomputes the blocks it could not fill.
    import random

    chunk, _ = h.stored_chunk(p, 2)
    chunk.view[:] = random.Random(0).randbytes(chunk.nbytes)
    h.llm.reset_prefix_cache()
    before = h.retrieved()
    r["after_corruption"], corrupt_lp = h.gen_logprobs(p)
    r["corruption_logprob_gap"] = _logprob_gap(cold_lp, corrupt_lp)
    r["loaded_after_corruption"] = h.retrieved() - before
    r["corrupt_chunks"] = h.m.get("lmcache:num_corrupt_chunks")
    r["failed_loads"] = [list(x[3]) for x in h.worker.recent if x[0] == "failed"]
    # The step whose load fell short stored nothing of that request (its blocks past
    # the load held other KV when the step began); the next request stores chunk 2.
    keys = h.engine.chunk(p).keys(h.engine.namespace)
    r["stored_after_short_load"] = h.engine.cpu.contains([keys[2]])[0]
    h.llm.reset_prefix_cache()
    r["again"] = h.gen(p)
    r["stored_again"] = h.engine.cpu.contains([keys[2]])[0]
    # Sensitivity of the oracle: with checksums off, plausible but wrong KV (the
    # second chunk's bytes in the third chunk's place) reaches the engine.
    h.engine.cpu._checksums = None
    chunk, _ = h.stored_chunk(p, 2)
    _, other = h.stored_chunk(p, 1)
    chunk.view[:] = other
    h.llm.reset_prefix_cache()
    r["wrong_kv"], wrong_lp = h.gen_logprobs(p)
    r["wrong_kv_logprob_gap"] = _logprob_gap(cold_lp, wrong_lp)
    return r


def scenario_restart(model: str) -> dict:
    """One process of a pair: the second, started after the first exited, hits from disk."""
    h = Harness(make_llm(model))
    p = tokens(5, 700)
    before = h.retrieved()
    out = h.gen(p)
    tiers = [t.name for t in h.engine.tiers]
    disk = h.engine.tiers[-1].backend  # behind its write-behind queue
    loaded = h.retrieved() - before
    # What vLLM's shutdown does (connector.shutdown -> worker close): queued
    # disk writes are finished before the process goes.
    h.worker.close()
    return {
        "out": out,
        "loaded": loaded,
        "tiers": tiers,
        "disk_chunks": len(list(disk.keys())),
    }


P2P_PROMPT = (11, 700)


def scenario_p2p_owner(model: str) -> dict:
    """Prefill a prompt, publish its chunks for peers, then serve them until told to stop."""
    h = Harness(make_llm(model))
    out = h.gen(tokens(*P2P_PROMPT))
    assert h.engine.flush(30)
    tiers = [t.name for t in h.engine.tiers]
    print("OWNER " + json.dumps({"out": out, "tiers": tiers}), flush=True)
    sys.stdin.readline()  # the reader is done
    return {"out": out}


def scenario_p2p_reader(model: str) -> dict:
    """Another instance: the same prompt must load from the owner's DRAM over NIXL."""
    h = Harness(make_llm(model))
    before = h.retrieved()
    out = h.gen(tokens(*P2P_PROMPT))
    return {
        "out": out,
        "loaded": h.retrieved() - before,
        "from_peer": h.m.get("lmcache:num_promotions", tier="p2p"),
        "tiers": [t.name for t in h.engine.tiers],
    }


def scenario_lora(model: str) -> dict:
    """The same prompt under adapter A, adapter B and none: each hits only its own KV."""
    from vllm.lora.request import LoRARequest

    adapters = json.loads(os.environ["LMC_TEST_ADAPTERS"])
    h = Harness(make_llm(model, {"enable_lora": True, "max_lora_rank": 8, "max_loras": 2}))
    loras = {
        "none": None,
        **{n: LoRARequest(n, i + 1, path) for i, (n, path) in enumerate(adapters.items())},
    }
    p = tokens(21, 600)
    r: dict = {"cold": {}, "hit": {}, "loaded_cold": {}, "loaded_hit": {}}
    for name, lora in loras.items():
        before = h.retrieved()
        r["cold"][name] = h.gen(p, lora)
        r["loaded_cold"][name] = h.retrieved() - before
    assert h.engine.flush(30)
    h.llm.reset_prefix_cache()
    for name, lora in reversed(list(loras.items())):
        before = h.retrieved()
        r["hit"][name] = h.gen(p, lora)
        r["loaded_hit"][name] = h.retrieved() - before
    return r


#: Real text for the real model: distinct facts in short documents, then a question.
_FACTS = [
    ("Mira Okafor", "a lighthouse keeper", "Tallinn", "violin"),
    ("Jonas Berg", "a glassblower", "Lisbon", "cello"),
    ("Aiko Tanaka", "a beekeeper", "Quebec", "flute"),
    ("Ravi Menon", "a clockmaker", "Nairobi", "oboe"),
    ("Elena Rossi", "a cartographer", "Hobart", "harp"),
    ("Tomas Novak", "a baker", "Valparaiso", "trumpet"),
]


def real_prompts(tokenizer, n: int = 20) -> list[list[int]]:
    """``n`` chat prompts of 300-700 tokens each (a few short documents and a question)."""
    import random

    out = []
    for i in range(n):
        rnd = random.Random(i)
        docs = rnd.sample(_FACTS, 4)
        text = ""
        for name, job, city, inst in docs:
            text += (
                f"{name} works as {job} in {city}. Every evening {name.split()[0]} plays the "
                f"{inst} for the neighbours, and on weekends {name.split()[0]} walks along the "
                f"harbour of {city}, counting the boats that come in from the sea. "
            ) * 2
        who = rnd.choice(docs)
        question = rnd.choice(
            [f"Where does {who[0]} work?", f"Which instrument does {who[0]} play?"]
        )
        msgs = [{"role": "user", "content": f"{text}\n\nAnswer in one sentence. {question}"}]
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer.encode(text, add_special_tokens=False)))
    return out


def scenario_real_tiers(model: str) -> dict:
    """The real model, authenticated tiers: a hit from DRAM, disk and Redis (each in turn
    the highest tier holding the prompt) gives token for token the cold run's output."""
    h = Harness(make_llm(model))
    prompts = real_prompts(h.llm.get_tokenizer())
    r: dict = {"tiers": [t.name for t in h.engine.tiers], "lengths": [len(p) for p in prompts]}
    r["cold"] = [h.gen(p) for p in prompts]
    assert h.engine.flush(60)
    tok = h.llm.get_tokenizer()
    r["sample_answer"] = tok.decode(r["cold"][0])
    for depth, tier in enumerate(h.engine.tiers):
        h.llm.reset_prefix_cache()
        for upper in h.engine.tiers[:depth]:  # the prompt is only in this tier and below
            for p in prompts:
                upper.remove(h.engine.chunk(p).keys(h.engine.namespace))
        before = h.m.get("lmcache:retrieved_bytes", tier=tier.name)
        loaded = h.retrieved()
        r[f"hit_{tier.name}"] = [h.gen(p) for p in prompts]
        r[f"loaded_{tier.name}"] = h.retrieved() - loaded
        r[f"bytes_from_{tier.name}"] = h.m.get("lmcache:retrieved_bytes", tier=tier.name) - before
        assert h.engine.flush(60)
    r["authenticated"] = {
        t.name: h.m.get("lmcache:tier_authenticated", tier=t.name) for t in h.engine.tiers[1:]
    }
    r["forged"] = h.m.get("lmcache:num_forged_chunks")
    return r


def scenario_real_p2p_owner(model: str) -> dict:
    h = Harness(make_llm(model))
    prompts = real_prompts(h.llm.get_tokenizer())
    out = [h.gen(p) for p in prompts]
    assert h.engine.flush(30)
    print(
        "OWNER " + json.dumps({"out": out, "tiers": [t.name for t in h.engine.tiers]}), flush=True
    )
    sys.stdin.readline()
    return {"out": out}


def scenario_real_p2p_reader(model: str) -> dict:
    h = Harness(make_llm(model))
    prompts = real_prompts(h.llm.get_tokenizer())
    before = h.retrieved()
    out = [h.gen(p) for p in prompts]
    return {
        "out": out,
        "loaded": h.retrieved() - before,
        "from_peer": h.m.get("lmcache:num_promotions", tier="p2p"),
        "authenticated": h.m.get("lmcache:tier_authenticated", tier="p2p"),
    }


def scenario_async_saves(model: str) -> dict:
    """Saves that finish after the step, forced on the CPU backend: vLLM keeps each
    finished request's blocks until the worker reports its saves done. With KV for
    only a few requests, blocks never given back would stall the engine."""
    import torch
    from vllm import SamplingParams

    block = 16 if torch.cuda.is_available() else 128  # vLLM's default block size there
    h = Harness(
        make_llm(
            model,
            # KV for ~4 requests (and one of the longest allowed)
            llm_kw={"num_gpu_blocks_override": 4 * -(-520 // block) + 2, "max_model_len": 2048},
            kv_connector_extra_config={"async_saves": True},
        )
    )
    reported: list[str] = []
    get_finished = h.worker.get_finished

    def spy(finished):
        done = get_finished(finished)
        reported.extend(done)
        return done

    h.worker.get_finished = spy
    prompts = [tokens(100 + i, 513) for i in range(12)]
    cold = [h.gen(p) for p in prompts[:4]]  # one at a time
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    batch = h.llm.generate([{"prompt_token_ids": p} for p in prompts[4:]], sp, use_tqdm=False)
    h.llm.reset_prefix_cache()
    before = h.retrieved()
    again = h.gen(prompts[0])
    return {
        "async": h.worker.async_saves,
        "finished_batch": sum(1 for o in batch if o.finished),
        "reported": len(set(reported)),
        "still_finishing": len(h.worker.tracker.finishing),
        "still_saving": len(h.worker.tracker.saving),
        "pending_saves": len(h.worker.saves),
        "loaded": h.retrieved() - before,
        "same_answer": again == cold[0],
        "stored": h.m.get("lmcache:num_stored_tokens"),
    }


def scenario_sliding_window(model: str) -> dict:
    """A model whose every layer slides (Mistral-style): vLLM drops the KV that leaves
    the window and puts its null block in the request's table there."""
    llm = make_llm(model)
    h = Harness(llm)
    r = {"spec": type(h.worker.kv_cache_config.kv_cache_groups[0].kv_cache_spec).__name__}
    a = tokens(1, 900)
    r["cold"] = h.gen(a)
    _, _, blocks, _ = h.last("save")
    computed = [h.kv_bytes(blocks, 256 * i, 256 * (i + 1)) for i in range(3)]
    keys = h.engine.chunk(a).keys(h.engine.namespace)
    r["stored_equals_computed"] = [h.stored_chunk(a, i)[1] == computed[i] for i in range(3)]
    # lmcache's DRAM tier evicts the prompt while vLLM's own cache still holds its window.
    h.engine.cpu.remove(keys)
    h.gen(a)  # vLLM's own hit: blocks before the window are its null block

    def stored():  # per chunk: None if not stored, else whether it is the computed KV
        return [
            (h.stored_chunk(a, i)[1] == computed[i])
            if h.engine.cpu.contains([keys[i]])[0]
            else None
            for i in range(3)
        ]

    r["stored_after_own_hit"] = stored()
    llm.reset_prefix_cache()
    h.gen(a)  # computed again: stored from its own blocks
    r["stored_after_recompute"] = stored()
    # A prompt within the window of chunk 0 loads it: it must be the computed KV.
    short = a[:300] + tokens(9, 40)
    ref = h.gen(short, salt="reference")  # computed in full
    llm.reset_prefix_cache()
    before = h.retrieved()
    r["short_matches"] = h.gen(short) == ref
    r["short_loaded"] = h.retrieved() - before
    # A load past the window writes the window's blocks only, never vLLM's null block.
    llm.reset_prefix_cache()
    r["hit"] = h.gen(a)
    _, _, load_blocks, load_range = h.last("load")
    r["load_range"] = list(load_range)
    r["null_blocks_in_table"] = load_blocks.count(0)
    return r


def _reload_weights(worker, path: str) -> bool:
    """A weight update, as an RL trainer pushes one (vLLM's in-place reload)."""
    worker.model_runner.reload_weights(weights_path=path)
    return True


def scenario_weight_update(model: str) -> dict:
    """After new weights and vLLM's cache reset (``reset_prefix_cache(reset_connector=True)``,
    what ``pause_generation(clear_cache=True)`` does), no KV of the old weights is loaded."""
    h = Harness(make_llm(model))
    llm = h.llm
    p = tokens(21, 700)
    r = {"old": h.gen(p)}  # stored under the old weights
    new_weights = os.environ["LMC_TEST_NEW_WEIGHTS"]  # another checkpoint of the same shape
    r["reloaded"] = all(llm.collective_rpc(_reload_weights, args=(new_weights,)))
    r["reset"] = llm.reset_prefix_cache(reset_connector=True)
    r["new_reference"] = h.gen(p, salt="reference")  # computed with the new weights
    before = h.retrieved()
    r["after_reset"] = h.gen(p)
    r["loaded_after_reset"] = h.retrieved() - before
    llm.reset_prefix_cache()  # vLLM's own cache only: lmcache's new KV must serve it
    before = h.retrieved()
    r["hit"] = h.gen(p)
    r["loaded_hit"] = h.retrieved() - before
    return r


def scenario_bad_chunk_size(model: str) -> dict:
    try:
        make_llm(model, kv_connector_extra_config={"chunk_size": 200})
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


if __name__ == "__main__":
    name, model = sys.argv[1], sys.argv[2]
    result = globals()[f"scenario_{name}"](model)
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # skip vLLM's slow teardown
