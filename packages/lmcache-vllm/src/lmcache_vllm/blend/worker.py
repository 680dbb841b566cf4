"""The worker side of blending: segment lookups, loads through the blend pass, stores.

Blend chunks are keyed in their own namespace (the engine's, plus
:data:`~lmcache_core.blend.BLEND_KEY_FORM`) and hold the neutral chunk
format (per layer, K then V, ``tokens x heads x head_size``) with K rotated
back to the segment's own positions (its first token at 0). So the bytes of
a segment do not depend on where it stood, and loading it at a new place is
one rotation by the new start.

A load never returns wrong KV: a chunk that is missing or unreadable at load
time (evicted since the lookup, a tier down) leaves its tokens uncached, and
the blend pass recomputes them like any hole. If the pass itself fails, the
blocks of the range are reported to vLLM, which recomputes them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from lmcache_core.blend import BLEND_KEY_FORM
from lmcache_core.blend.selection import SelectionPolicy
from lmcache_core.engine import CacheEngine
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey, ChunkSpan
from lmcache_core.transfer import ChunkIO

from lmcache_vllm.blend.forward import BlendInputs, BlendModel, BlendResult, run_blend
from lmcache_vllm.blend.paged import PagedKV
from lmcache_vllm.blend.specs import BlendLoadSpec, BlendSaveSpec

logger = logging.getLogger("vllm.lmcache")


def _spans(digests: Sequence[bytes], chunk_size: int, num_tokens: int) -> list[ChunkSpan]:
    return [
        ChunkSpan(i * chunk_size, min((i + 1) * chunk_size, num_tokens), d)
        for i, d in enumerate(digests)
    ]


class _RunWriter:
    """Writes retrieved chunks of one run into the staging KV (rows of ``[P, L)``)."""

    def __init__(
        self, staging: torch.Tensor, cached: torch.Tensor, row0: int, lo: int, hi: int
    ) -> None:
        self.staging, self.cached = staging, cached
        self.row0, self.lo, self.hi = row0, lo, hi  # segment-local [lo, hi) go to rows row0+lo..

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        layers, _, _, heads, dim = self.staging.shape
        for io in chunks:
            src = torch.frombuffer(io.buffer, dtype=self.staging.dtype).view(
                layers, 2, io.num_tokens, heads, dim
            )
            a, b = max(io.start, self.lo), min(io.end, self.hi)
            if a >= b:
                continue
            rows = slice(self.row0 + a, self.row0 + b)
            self.staging[:, :, rows] = src[:, :, a - io.start : b - io.start]
            self.cached[rows] = True


class _SegmentReader:
    """Reads a segment's tokens from vLLM's blocks into chunk buffers, K moved to position 0.

    Layer by layer and chunk by chunk: K and V copied from vLLM's blocks
    straight into the chunk's slot, then K rotated there in place.
    """

    def __init__(self, worker: BlendWorker, block_ids: list[int], seg_start: int) -> None:
        self.w, self.block_ids, self.seg_start = worker, block_ids, seg_start

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:
        if not chunks:
            return
        w = self.w
        lay = w.engine.layout
        dsts = [
            torch.frombuffer(c.buffer, dtype=w.dtype).view(
                lay.num_layers, 2, c.num_tokens, lay.num_kv_heads, lay.head_size
            )
            for c in chunks
        ]
        for li in range(lay.num_layers):
            for c, dst in zip(chunks, dsts):
                k, v = dst[li, 0], dst[li, 1]  # contiguous [tokens, heads, dim] in the slot
                w.paged.read_into(li, self.block_ids, self.seg_start + c.start, k, v)
                w.model.rope.shift_(k, -self.seg_start)


class BlendWorker:
    """One rank's blending: owns the blend pass over vLLM's model and KV."""

    def __init__(
        self,
        engine: CacheEngine,
        model: Any,
        layers: list[torch.Tensor],
        attn_layers: list[Any],
        *,
        world_size: int = 1,
    ) -> None:
        cfg = engine.config
        self.engine = engine
        self.model = BlendModel(model, attn_layers)
        self.paged = PagedKV(engine.layout, layers, attn_layers)
        n_layers = len(layers)
        if max(cfg.blend_check_layers) >= n_layers:
            raise ConfigError(
                [
                    f"blend_check_layers={list(cfg.blend_check_layers)}: this model has layers "
                    f"0..{n_layers - 1}"
                ],
                "lmcache-vllm",
            )
        self.check_layers = tuple(cfg.blend_check_layers)
        self.ratios = tuple(cfg.blend_recompute_ratios)
        self.policy = SelectionPolicy.from_config(cfg)
        ns = engine.namespace
        self.namespace = dataclasses.replace(ns, extra=tuple(sorted((*ns.extra, BLEND_KEY_FORM))))
        self.dtype = layers[0].dtype
        self.device = layers[0].device
        self.last: BlendResult | None = None  # the latest blend (for tests and debugging)
        self.world_size = world_size
        self.all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        if world_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            self.all_reduce = tensor_model_parallel_all_reduce

    def keys(self, digests: Sequence[bytes]) -> list[CacheKey]:
        ns = self.namespace.digest
        return [CacheKey(ns + d) for d in digests]

    # ------------------------------------------------------------------ lookup

    def lookup(self, chains: list[list[bytes]], owner: str) -> list[int]:
        """Leading chunks held of each segment, pinned for ``owner`` until its load."""
        return self.engine.lookup_chains([self.keys(c) for c in chains], pin_owner=owner)

    # ------------------------------------------------------------------ reads of vLLM's KV

    def read_tokens(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """KV of tokens ``[start, end)``: ``[layers, 2, n, heads, dim]`` in the KV dtype."""
        out = []
        for li in range(len(self.paged.layers)):
            k, v = self.paged.read(li, block_ids, start, end)
            out.append(torch.stack([k, v]))
        return torch.stack(out)

    # ------------------------------------------------------------------ load

    def load(self, spec: BlendLoadSpec) -> BlendResult:
        """Blend tokens ``[spec.start, spec.until)`` into the request's blocks."""
        t0 = time.perf_counter()
        lay = self.engine.layout
        n = spec.until - spec.start
        staging = torch.zeros(
            (lay.num_layers, 2, n, lay.num_kv_heads, lay.head_size), dtype=self.dtype, device="cpu"
        )
        cached = torch.zeros(n, dtype=torch.bool)
        for run in spec.runs:
            lo = run.start - run.segment_start
            hi = lo + run.num_tokens
            writer = _RunWriter(staging, cached, run.segment_start - spec.start, lo, hi)
            # The chunks' own sizes (a run cut short still loads whole chunks).
            spans = _spans(run.digests, spec.chunk_size, run.segment_end - run.segment_start)
            self.engine.retrieve_chunks(self.keys(run.digests), spans, writer)
        self.engine.unpin(spec.req_id)
        if self.all_reduce is not None:  # a row counts as cached only if every rank has it
            have = self.all_reduce(cached.to(self.device, torch.int32)).cpu()
            cached &= have == self.world_size
        t_load = time.perf_counter()
        self._rotate_runs(staging, cached, spec)
        staging = staging.to(self.device)
        result = run_blend(
            self.model,
            self.paged,
            BlendInputs(
                token_ids=torch.tensor(spec.token_ids, dtype=torch.int64, device=self.device),
                start=spec.start,
                block_ids=spec.block_ids,
                cached_kv=staging,
                cached=cached,
                check_layers=self.check_layers,
                ratios=self.ratios,
                policy=self.policy,
                segment_offsets=(
                    self._segment_offsets(spec)
                    if "segment_starts" in self.policy.rankings
                    else None
                ),
                tail_ids=(
                    torch.tensor(spec.tail_ids, dtype=torch.int64, device=self.device)
                    if spec.tail_ids
                    else None
                ),
            ),
            self.all_reduce,
        )
        self.last = result
        m = self.engine.metrics
        m.inc("lmcache:blend_requests")
        m.inc("lmcache:blend_reused_tokens", result.reused)
        m.inc("lmcache:blend_recomputed_tokens", result.recomputed)
        m.observe("lmcache:blend_deviation", result.deviation)
        m.observe("lmcache:blend_residual_deviation", result.residual)
        m.observe("lmcache:blend_recomputed_fraction", result.recomputed / max(1, n))
        if result.fallback:
            m.inc("lmcache:blend_fallbacks")
            logger.warning(
                "lmcache: blend of %s left K deviation %.2e > blend_max_deviation %.2e in its "
                "reused tokens: recomputed in full",
                spec.req_id,
                result.residual,
                self.policy.max_deviation,
            )
        logger.info(
            "lmcache: blended tokens [%d, %d) of %s: %d reused, %d recomputed, K deviation "
            "%.2e, left %.2e (load %.1f ms, pass %.1f ms)",
            spec.start,
            spec.until,
            spec.req_id,
            result.reused,
            result.recomputed,
            result.deviation,
            result.residual,
            (t_load - t0) * 1e3,
            (time.perf_counter() - t_load) * 1e3,
        )
        return result

    @staticmethod
    def _segment_offsets(spec: BlendLoadSpec) -> np.ndarray:
        """Each row's distance from its segment's first token (rows outside runs: 0, holes).

        From the runs, not from the cached rows: two segments given as touching spans
        make one run of cached rows, and a run clipped by vLLM's own prefix hit starts
        inside its segment."""
        out = np.zeros(spec.until - spec.start, dtype=np.int64)
        for run in spec.runs:
            a = run.start - spec.start
            out[a : a + run.num_tokens] = np.arange(run.num_tokens) + (
                run.start - run.segment_start
            )
        return out

    def _rotate_runs(
        self, staging: torch.Tensor, cached: torch.Tensor, spec: BlendLoadSpec
    ) -> None:
        """Stored K sits at segment-local positions: move each run's rows to where it stands now."""
        for run in spec.runs:
            a = run.start - spec.start
            b = a + run.num_tokens
            if run.segment_start == 0 or not bool(cached[a:b].any()):
                continue
            for li in range(staging.shape[0]):
                self.model.rope.shift_(staging[li, 0, a:b], run.segment_start)

    # ------------------------------------------------------------------ store

    def save(self, spec: BlendSaveSpec) -> int:
        """Store the segments' chunks the cache lacks; returns tokens newly stored."""
        stored = 0
        for seg in spec.segments:
            length = seg.end - seg.start
            keys = self.keys(seg.digests)
            spans = _spans(seg.digests, spec.chunk_size, length)
            reader = _SegmentReader(self, spec.block_ids, seg.start)
            stored += self.engine.store_chunks(keys, spans, reader)
        return stored


def blend_worker(
    vllm_config: Any, engine: CacheEngine, kv_caches: dict[str, torch.Tensor], world: int
) -> BlendWorker:
    """The blend pass of a worker whose model lmcache can blend; a clear error otherwise."""
    from lmcache_vllm.blend.models import SUPPORTED, find_model
    from lmcache_vllm.layouts import ordered_layers

    forward_context = vllm_config.compilation_config.static_forward_context
    names = [name for name, _ in ordered_layers(kv_caches)]
    attn = {name: forward_context[name] for name in names if name in forward_context}
    model = find_model(attn)
    if model is None or len(attn) != len(names):
        archs = getattr(vllm_config.model_config, "architectures", None) or ["?"]
        raise ConfigError(
            [
                f"enable_blending: model {archs[0]} is not one lmcache can blend. Supported: "
                f"{', '.join(SUPPORTED)} (dense RoPE decoders), with lmcache's vLLM plugin "
                "loaded (it is, unless VLLM_PLUGINS leaves out 'lmcache'); or turn "
                "enable_blending off"
            ],
            "lmcache-vllm",
        )
    layers = [t for _, t in ordered_layers(kv_caches)]
    return BlendWorker(engine, model, layers, [attn[n] for n in names], world_size=world)
