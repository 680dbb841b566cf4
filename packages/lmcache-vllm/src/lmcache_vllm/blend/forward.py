"""The blend pass: vLLM's own layers over the blend range, recomputing a few tokens.

For tokens ``[P, L)`` of a request (``P``: what vLLM already holds; ``L``:
the end of the last cached run) the pass

1. embeds all of them and runs every layer up to the last check layer for
   all of them (their fresh K/V is exact there: only embeddings feed it);
2. at each check layer scores each cached token by how far its fresh K is
   from its cached, re-rotated K, and keeps the highest (plus every hole);
3. runs the later layers for the kept tokens only: their fresh K/V replaces
   the cached rows, the others keep the cached KV, and the kept queries
   attend to the whole blended range (and the context before ``P``) with
   each token's *true* causal position (not a bottom-right mask);
4. writes every layer's K/V of ``[P, L)`` into vLLM's blocks through the
   attention backend's own write op.

Attention outputs nobody reads are not computed: at a check layer only the
kept tokens' (the others' hidden states end there), at the last layer none
(vLLM computes the logits from the KV, in its own pass over the tail).

The layers are vLLM's modules, called as vLLM's model calls them
(``layer(positions, hidden, residual)``), with the attention module swapped
for :class:`_BlendAttention` for the duration of the pass: that is the one
place the pass differs from a forward, so every family whose decoder layer
calls ``self.attn(q, k, v)`` after its rotary embedding (Llama, Mistral,
Qwen2, Qwen3) works unchanged. Attention is torch's scaled-dot-product
attention over query blocks, each bounded to the keys it can see.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lmcache_core.blend.selection import CheckOutcome, SelectionPolicy, choose, segment_offsets
from lmcache_core.errors import ConfigError
from torch import nn

from lmcache_vllm.blend.paged import PagedKV
from lmcache_vllm.blend.rope import RopeShift

#: Query rows per attention block: bounds the score matrix (rows x keys x heads).
QUERY_BLOCK = 256


def _refuse(why: str) -> ConfigError:
    return ConfigError([f"enable_blending: {why}"], "lmcache-vllm")


class BlendModel:
    """The parts of a vLLM decoder model a blend pass drives, checked once at start."""

    def __init__(self, model: nn.Module, attn_layers: list[Any]) -> None:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if inner is None or layers is None or not hasattr(inner, "embed_input_ids"):
            raise _refuse(f"{type(model).__name__} is not a decoder of the supported shape")
        start, end = getattr(inner, "start_layer", 0), getattr(inner, "end_layer", len(layers))
        self.layers = [layers[i] for i in range(start, end)]
        if len(self.layers) != len(attn_layers):
            raise _refuse(
                f"the model has {len(self.layers)} layers here and {len(attn_layers)} KV caches"
            )
        self.inner = inner
        for i, (layer, attn) in enumerate(zip(self.layers, attn_layers)):
            self_attn = getattr(layer, "self_attn", None)
            if self_attn is None or getattr(self_attn, "attn", None) is not attn:
                raise _refuse(f"layer {i} does not hold its attention as self_attn.attn")
            sw = getattr(attn, "sliding_window", None)
            if sw not in (None, -1) or getattr(attn.impl, "sliding_window", -1) not in (
                None,
                -1,
                (-1, -1),
            ):
                raise _refuse("sliding-window attention is not supported")
            if (
                getattr(attn.impl, "logits_soft_cap", None)
                or getattr(attn.impl, "alibi_slopes", None) is not None
            ):
                raise _refuse("attention with logit soft-capping or ALiBi is not supported")
            if getattr(attn.impl, "sinks", None) is not None:
                raise _refuse("attention sinks are not supported")
        self.attn = list(attn_layers)
        first = self.layers[0].self_attn
        rotary = getattr(first, "rotary_emb", None)
        if rotary is None:
            raise _refuse("the model has no rotary embedding (RoPE) module")
        self.rope = RopeShift(rotary)
        a0 = self.attn[0]
        self.num_heads, self.num_kv_heads = a0.num_heads, a0.num_kv_heads
        self.head_size = a0.head_size
        self.scale = float(a0.impl.scale)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.embed_input_ids(ids)

    @contextlib.contextmanager
    def attention(self, i: int, module: nn.Module) -> Iterator[None]:
        """Layer ``i`` calls ``module`` instead of vLLM's attention inside this block."""
        parent = self.layers[i].self_attn
        original = parent.attn
        parent.attn = module
        try:
            yield
        finally:
            parent.attn = original


@dataclass
class BlendInputs:
    """One request's blend: tokens ``[P, L)`` with what the cache gave for them."""

    token_ids: torch.Tensor  # [n] ids of tokens [P, L)
    start: int  # P
    block_ids: list[int]
    cached_kv: torch.Tensor  # [layers, 2, n, kv_heads, head_size], K re-rotated to now
    cached: torch.Tensor  # [n] bool: the row has cached KV
    check_layers: tuple[int, ...]
    ratios: tuple[float, ...]
    policy: SelectionPolicy = SelectionPolicy()
    # ids of the prompt's tokens after L (the question), for question_attention: they run
    # up to the first check layer beside the range and are dropped there
    tail_ids: torch.Tensor | None = None
    # each row's distance from the start of its segment (segment_starts ranks by it);
    # None: from the runs of cached rows
    segment_offsets: np.ndarray | None = None


@dataclass
class BlendResult:
    rows: torch.Tensor  # rows of [P, L) recomputed in every layer (sorted)
    reused: int  # rows that kept cached KV after the last check layer
    # at the first check layer, relative to the cached tokens' K energy: the K deviation
    # of the cached tokens, and what the reused ones keep; fallback: the guard tripped
    deviation: float = 0.0
    residual: float = 0.0
    fallback: bool = False

    @property
    def recomputed(self) -> int:
        return int(self.rows.numel())


def causal_attention(
    q: torch.Tensor, q_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q`` ([m, heads, d], at positions ``q_pos``) over keys 0..len(k)-1, causally.

    Each query sees the keys at positions <= its own. Queries go in blocks
    (sorted positions), each over the keys up to its last query's position.
    """
    m, heads = q.shape[:2]
    kv_heads = k.shape[1]
    out = torch.empty_like(q)
    for lo in range(0, m, QUERY_BLOCK):
        hi = min(m, lo + QUERY_BLOCK)
        pos = q_pos[lo:hi]
        n_keys = int(pos.max()) + 1
        mask = torch.arange(n_keys, device=q.device).unsqueeze(0) <= pos.unsqueeze(1)
        qb = q[lo:hi].transpose(0, 1).unsqueeze(0)  # [1, heads, rows, d]
        kb = k[:n_keys].transpose(0, 1).unsqueeze(0)
        vb = v[:n_keys].transpose(0, 1).unsqueeze(0)
        o = torch.nn.functional.scaled_dot_product_attention(
            qb, kb, vb, attn_mask=mask, scale=scale, enable_gqa=kv_heads != heads
        )
        out[lo:hi] = o[0].transpose(0, 1)
    return out


class _BlendAttention(nn.Module):
    """Stands in for a layer's attention during the pass (see the module docstring)."""

    def __init__(self, run: _BlendRun, layer: int) -> None:
        super().__init__()
        self.run, self.layer = run, layer

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kw: Any
    ) -> torch.Tensor:
        return self.run.attend(self.layer, q, k, v)


def attention_mass(
    q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, scale: float, lo: int, hi: int
) -> torch.Tensor:
    """How much attention queries ``q`` ([t, heads, d] at ``q_pos``) pay each key of
    ``[lo, hi)``, summed over queries and heads: question_attention's score."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    kk = keys.float().repeat_interleave(heads // kv_heads, dim=1)
    mass = torch.zeros(hi - lo, dtype=torch.float32, device=q.device)
    # Query blocks bound the score matrix (a long uncached tail is all question here).
    for a in range(0, q.shape[0], QUERY_BLOCK):
        b = min(q.shape[0], a + QUERY_BLOCK)
        logits = torch.einsum("thd,khd->htk", q[a:b].float(), kk) * scale
        seen = torch.arange(keys.shape[0], device=q.device).unsqueeze(0) <= q_pos[a:b, None]
        logits = logits.masked_fill(~seen.unsqueeze(0), float("-inf"))
        mass += logits.softmax(-1)[:, :, lo:hi].sum(dim=(0, 1))
    return mass


class _BlendRun:
    def __init__(
        self,
        model: BlendModel,
        paged: PagedKV,
        inputs: BlendInputs,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.model, self.paged, self.inp = model, paged, inputs
        self.all_reduce = all_reduce
        n = inputs.token_ids.shape[0]
        self.n = n
        self.n_layers = len(model.layers)
        self.active = torch.arange(n)  # rows of [P, L) being computed
        self.selected: torch.Tensor | None = None  # set at a check layer, applied after it
        self.outcome: CheckOutcome | None = None  # the first check layer's
        # The question's rows ride after the range's up to the first check layer only.
        tail = inputs.tail_ids if inputs.policy.needs_question else None
        self.tail = 0 if tail is None else int(tail.numel())
        dev = inputs.cached_kv.device
        self.positions = torch.arange(inputs.start, inputs.start + n + self.tail, device=dev)
        from lmcache_vllm.blend.paged import slot_mapping

        self.slots = slot_mapping(inputs.block_ids, paged.bs, inputs.start, inputs.start + n)

    def input_ids(self) -> torch.Tensor:
        ids = self.inp.token_ids
        if self.tail:
            assert self.inp.tail_ids is not None
            ids = torch.cat([ids, self.inp.tail_ids.to(ids.device)])
        return ids

    def row_positions(self) -> torch.Tensor:
        pos = self.positions[self.active]
        return torch.cat([pos, self.positions[self.n :]]) if self.tail else pos

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        m = self.model
        h, kvh, d = m.num_heads, m.num_kv_heads, m.head_size
        q = q.reshape(-1, h, d)
        k = k.reshape(-1, kvh, d)
        v = v.reshape(-1, kvh, d)
        inp = self.inp
        t = self.tail
        if t:  # the question's rows: attend, never written to vLLM's blocks
            qt, kt, vt = q[-t:], k[-t:], v[-t:]
            q, k, v = q[:-t], k[:-t], v[:-t]
        # The context before P: read where something attends to it (not at the last layer,
        # whose outputs nobody reads, unless the question is scored there).
        last = li == self.n_layers - 1
        ctx_k = ctx_v = None
        if inp.start and (not last or (t and li in inp.check_layers)):
            ctx_k, ctx_v = self.paged.read(li, inp.block_ids, 0, inp.start)
        if li in inp.check_layers:
            q_mass = None
            if t:
                keys = torch.cat([x.to(k.dtype) for x in (ctx_k, k, kt) if x is not None])
                q_mass = attention_mass(
                    qt, self.positions[self.n :], keys, m.scale, inp.start, inp.start + self.n
                )
            self._check(li, k, v, q_mass)  # before the fresh rows replace the cached ones
        if self.active.numel() == self.n:
            k_all, v_all = k, v
        else:  # this layer's staging is not needed after this: blend in place
            k_all, v_all = inp.cached_kv[li, 0], inp.cached_kv[li, 1]
            k_all[self.active] = k.to(k_all.dtype)
            v_all[self.active] = v.to(v_all.dtype)
        self.paged.write(li, self.slots, k_all, v_all)
        # Rows whose output a later layer reads: at a check layer only the kept ones
        # (the others' hidden states stop here), after the last layer none at all.
        if last:
            return q.new_zeros(q.shape[0] + t, h * d)
        rows = None
        if self.selected is not None:
            rows = torch.searchsorted(self.active, self.selected)
        if ctx_k is not None and ctx_v is not None:
            k_all = torch.cat([ctx_k.to(k_all.dtype), k_all])
            v_all = torch.cat([ctx_v.to(v_all.dtype), v_all])
        q_pos = self.positions[self.active]
        k_all, v_all = k_all.to(q.dtype), v_all.to(q.dtype)
        if rows is None:
            out = causal_attention(q, q_pos, k_all, v_all, m.scale)
        else:
            out = q.new_zeros(q.shape)
            out[rows] = causal_attention(q[rows], q_pos[rows], k_all, v_all, m.scale)
        out = out.reshape(q.shape[0], h * d)
        if t:
            if rows is None:  # before the first check layer: later layers read the question
                kq = torch.cat([k_all, kt.to(q.dtype)])
                vq = torch.cat([v_all, vt.to(q.dtype)])
                ot = causal_attention(qt, self.positions[self.n :], kq, vq, m.scale)
            else:  # dropped after this layer
                ot = qt.new_zeros(qt.shape)
            out = torch.cat([out, ot.reshape(t, h * d)])
        return out

    def _check(
        self, li: int, k: torch.Tensor, v: torch.Tensor, q_mass: torch.Tensor | None
    ) -> None:
        inp = self.inp
        pol = inp.policy
        idx = inp.check_layers.index(li)
        if self.outcome is not None and self.outcome.fallback:
            return  # the guard tripped: every later layer recomputes every row
        act = self.active
        dev = k.device

        def per_row(x: torch.Tensor) -> torch.Tensor:
            z = torch.zeros(self.n, dtype=torch.float32, device=dev)
            z[act] = x.float()
            return z

        kf, kc = k.float(), inp.cached_kv[li, 0][act].float()
        cols = {"k_deviation": ((kf - kc) ** 2).sum(dim=(1, 2)), "k_energy": (kf**2).sum((1, 2))}
        if {"v_deviation", "kv_deviation"} & set(pol.rankings):
            vf, vc = v.float(), inp.cached_kv[li, 1][act].float()
            cols["v_deviation"] = ((vf - vc) ** 2).sum(dim=(1, 2))
            cols["v_energy"] = (vf**2).sum(dim=(1, 2))
        if q_mass is not None:
            cols["question_attention"] = q_mass[act]
        names = list(cols)
        stacked = torch.stack([per_row(cols[c]) for c in names])
        if self.all_reduce is not None:  # every rank must keep the same tokens
            stacked = self.all_reduce(stacked)
        feats = dict(zip(names, stacked.cpu().numpy()))
        cached = inp.cached.cpu().numpy()
        a = act.cpu().numpy()
        if "v_deviation" in feats:
            ek, ev = feats["k_energy"][a].sum() or 1.0, feats["v_energy"][a].sum() or 1.0
            feats["kv_deviation"] = feats["k_deviation"] / ek + feats["v_deviation"] / ev
        # Only the rankings the policy names are computed.
        if "segment_starts" in pol.rankings:
            offsets = inp.segment_offsets
            if offsets is None:
                offsets = segment_offsets(cached)
            feats["segment_starts"] = -np.asarray(offsets, dtype=np.float64)
        if "random" in pol.rankings:
            feats["random"] = np.random.default_rng(self.n).random(self.n)
        if "question_attention" in pol.rankings:
            # Past the first check layer the question is gone: K deviation ranks there.
            feats.setdefault("question_attention", feats["k_deviation"])
        outcome = choose(pol, feats, cached, a, inp.ratios[idx], guard=idx == 0)
        if idx == 0:
            self.outcome = outcome
        self.selected = torch.from_numpy(np.asarray(outcome.keep, dtype=np.int64))

    def advance(
        self, hidden: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After a layer: keep only the rows a check layer selected (the question's go)."""
        if self.selected is None:
            return hidden, residual
        local = torch.searchsorted(self.active, self.selected)
        self.active, self.selected, self.tail = self.selected, None, 0
        return hidden[local], residual[local]


def run_blend(
    model: BlendModel,
    paged: PagedKV,
    inputs: BlendInputs,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> BlendResult:
    """Blend tokens ``[P, L)`` of one request into its vLLM blocks (see the module docstring)."""
    run = _BlendRun(model, paged, inputs, all_reduce)
    with torch.inference_mode():
        hidden = model.embed(run.input_ids())
        residual: torch.Tensor | None = None
        for li, layer in enumerate(model.layers):
            with model.attention(li, _BlendAttention(run, li)):
                hidden, residual = layer(run.row_positions(), hidden, residual)
            assert residual is not None
            hidden, residual = run.advance(hidden, residual)
    o = run.outcome
    return BlendResult(
        rows=run.active,
        reused=run.n - int(run.active.numel()),
        deviation=o.deviation if o else 0.0,
        residual=o.residual if o else 0.0,
        fallback=bool(o and o.fallback),
    )
