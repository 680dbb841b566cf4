"""Blending's pieces on vLLM's real modules, without an engine: the RoPE shift with vLLM's
rotary embeddings, token reads/writes of vLLM's CPU blocks, causal attention, segments
with the real model's tokenizer."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from lmcache_core.blend import rope as ref  # noqa: E402
from lmcache_core.errors import ConfigError  # noqa: E402
from lmcache_core.layout import KVLayout  # noqa: E402


@pytest.fixture(scope="module")
def vllm_config(tiny_model):
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config

    cfg = VllmConfig(model_config=ModelConfig(model=str(tiny_model), dtype="float32"))
    with set_current_vllm_config(cfg):
        yield cfg


def _rope(neox=True, params=None):
    from vllm.model_executor.layers.rotary_embedding import get_rope

    params = params or {"rope_type": "default", "rope_theta": 100000.0}
    return get_rope(64, 8192, neox, params, torch.float32)


# ---------------------------------------------------------------------------- RoPE shift


@pytest.mark.parametrize("neox", [True, False])
def test_shift_moves_keys_to_new_positions_with_the_models_own_frequencies(vllm_config, neox):
    from lmcache_vllm.blend.rope import RopeShift

    rotary = _rope(neox)
    shift = RopeShift(rotary)
    freqs = rotary._compute_inv_freq(rotary.base).double().numpy()
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((200, 3, 64))
    old = rng.integers(0, 4000, 200)
    for delta in (rng.integers(-old, 4000), np.full(200, 4100), -old):
        stored = torch.from_numpy(ref.apply_rope(raw, old, freqs, neox=neox)).float()
        moved = shift.shift(stored, torch.from_numpy(delta)).double().numpy()
        fresh = ref.apply_rope(raw, old + delta, freqs, neox=neox)
        assert np.abs(moved - fresh).max() < 1e-5
    # vLLM's own rotation at the new positions, from its rotation at the old ones: the same
    # pairing convention (a wrong one is off by O(1)); vLLM's float32 angles are off by up
    # to half an ulp of the position (3e-5 at 500), so that bounds the agreement.
    pos_old = torch.arange(0, 300)
    pos_new = pos_old + 211
    k = torch.from_numpy(raw[:, :, :].reshape(200, -1)).float()[:150].repeat(2, 1)
    q = torch.zeros(300, 64)
    _, k_old = rotary.forward_native(pos_old, q.clone(), k.clone())
    _, k_new = rotary.forward_native(pos_new, q.clone(), k.clone())
    ours = shift.shift(k_old.view(300, 3, 64), 211)
    torch.testing.assert_close(ours, k_new.view(300, 3, 64), atol=2e-4, rtol=0)
    # A zero shift returns the keys bit for bit.
    assert torch.equal(shift.shift(k_old.view(300, 3, 64), 0), k_old.view(300, 3, 64))


def test_scalings_that_stay_rotations_are_taken_and_others_refused(vllm_config):
    from lmcache_vllm.blend.rope import RopeShift

    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 2048,
        "rope_theta": 500000.0,
    }
    RopeShift(_rope(True, llama3))
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    with pytest.raises(ConfigError, match="enable_blending"):
        RopeShift(_rope(True, {**yarn, "rope_theta": 10000.0}))


# ---------------------------------------------------------------------------- vLLM's CPU blocks


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("isa", ["vec", "vec16"])
def test_tokens_written_through_the_backend_read_back_exactly(vllm_config, dtype, isa):
    from lmcache_vllm.blend.paged import PagedKV, slot_mapping
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    heads, dim, bs, nb = 2, 64, 32, 6
    tdt = getattr(torch, dtype)
    impl = CPUAttentionBackendImpl(4, dim, dim**-0.5, heads, None, None, "auto")
    attn = SimpleNamespace(impl=impl, isa=isa, _k_scale_float=1.0, _v_scale_float=1.0)
    layers = [torch.zeros(nb, heads, bs, 2 * dim, dtype=tdt) for _ in range(2)]
    layout = KVLayout("vllm_cpu", dtype, 2, heads, dim, bs)
    paged = PagedKV(layout, layers, [attn, attn])
    blocks = [4, 1, 5]  # a request's block table, out of order
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(90, heads, dim, generator=gen).to(tdt)
    v = torch.randn(90, heads, dim, generator=gen).to(tdt)
    paged.write(1, slot_mapping(blocks, bs, 0, 90), k, v)
    got_k, got_v = paged.read(1, blocks, 0, 90)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)
    part_k, part_v = paged.read(1, blocks, 37, 61)  # a range inside blocks
    assert torch.equal(part_k, k[37:61]) and torch.equal(part_v, v[37:61])
    assert not layers[0].any()  # the other layer untouched
    # The packing is the backend's (K is not stored row-major for these ISAs).
    assert not torch.equal(layers[1][4, 0, :, :dim].reshape(-1), k[:32, 0].reshape(-1))


# ---------------------------------------------------------------------------- attention


def test_causal_attention_uses_each_querys_true_position():
    from lmcache_vllm.blend.forward import QUERY_BLOCK, causal_attention

    gen = torch.Generator().manual_seed(1)
    n, heads, kvh, d = QUERY_BLOCK + 90, 4, 2, 16
    q = torch.randn(n, heads, d, generator=gen)
    k = torch.randn(n, kvh, d, generator=gen)
    v = torch.randn(n, kvh, d, generator=gen)
    rows = torch.tensor(sorted(np.random.default_rng(2).choice(n, 120, replace=False)))
    got = causal_attention(q[rows], rows, k, v, 0.25)
    kk = k.repeat_interleave(heads // kvh, dim=1)
    vv = v.repeat_interleave(heads // kvh, dim=1)
    for i, p in enumerate(rows.tolist()):
        w = torch.softmax((q[p] * kk[: p + 1]).sum(-1) * 0.25, dim=0)  # [p+1, heads]
        want = (w.unsqueeze(-1) * vv[: p + 1]).sum(0)
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)


def test_the_question_s_attention_mass_matches_a_direct_softmax_across_query_blocks():
    from lmcache_vllm.blend.forward import QUERY_BLOCK, attention_mass

    gen = torch.Generator().manual_seed(3)
    t, keys_n, heads, kvh, d = QUERY_BLOCK + 40, 700, 4, 2, 16
    q = torch.randn(t, heads, d, generator=gen)
    keys = torch.randn(keys_n, kvh, d, generator=gen)
    pos = torch.arange(keys_n - t, keys_n)  # the tail: the last t positions
    got = attention_mass(q, pos, keys, 0.25, 100, 300)
    kk = keys.repeat_interleave(heads // kvh, dim=1)
    want = torch.zeros(200)
    for i, p in enumerate(pos.tolist()):
        w = torch.softmax((q[i] * kk[: p + 1]).sum(-1) * 0.25, dim=0)  # [p+1, heads]
        want += w[100:300].sum(-1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_segment_offsets_come_from_the_runs_not_from_the_cached_rows():
    from lmcache_vllm.blend.specs import BlendLoadSpec, RunRef
    from lmcache_vllm.blend.worker import BlendWorker

    runs = [
        RunRef(segment_start=0, segment_end=50, start=10, num_tokens=40, digests=[]),
        RunRef(segment_start=50, segment_end=90, start=50, num_tokens=40, digests=[]),
        RunRef(segment_start=95, segment_end=120, start=95, num_tokens=20, digests=[]),
    ]
    spec = BlendLoadSpec("r", [], start=10, until=115, token_ids=[], chunk_size=256, runs=runs)
    off = BlendWorker._segment_offsets(spec)
    assert len(off) == 105
    assert off[0] == 10  # a run clipped by vLLM's own hit starts inside its segment
    assert off[39] == 49 and off[40] == 0  # two touching segments: the second starts at 0
    assert off[79] == 39 and off[80:85].tolist() == [0] * 5  # the gap: holes
    assert off[85:].tolist() == list(range(20))


# ---------------------------------------------------------------------------- segments, real text


def test_a_document_has_the_same_segment_tokens_wherever_it_stands(smollm2_model):
    from lmcache_core.blend import segments_from_text
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_model)
    sep = " # # "
    doc = "Mira Castell lives in Lisbon. She keeps bees on the roof of her house."
    prompts = [
        doc + sep + "Question: where?",  # first, no separator before it
        "<|im_start|>user\nNotes:" + sep + doc + sep + "Question: where?",
        "Another note entirely, ending in a digit 7" + sep + doc + sep + "Q",
        "Intro." + sep + doc,  # last, nothing after it
    ]
    seen = []
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        enc = tok(tok.decode(ids), add_special_tokens=False, return_offsets_mapping=True)
        assert enc["input_ids"] == ids
        segs = segments_from_text(text, enc["offset_mapping"], sep)
        doc_seg = [s for s in segs if "Lisbon" in tok.decode(ids[s.start : s.end])]
        (s,) = doc_seg
        seen.append(ids[s.start : s.end])
    assert all(x == seen[0] for x in seen), [tok.decode(x) for x in seen]
    assert len(seen[0]) >= len(tok(doc)["input_ids"]) - 3  # at most the boundary tokens lost
