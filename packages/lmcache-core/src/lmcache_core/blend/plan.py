"""Which tokens of a blend request come from the cache, and which are computed.

The scheduler looks up each segment's chunks (leading chunks held, like a
prefix lookup but inside the segment), then :func:`plan_blend` decides:

* the *blend range* ``[computed, until)``: from what the engine already holds
  (its own prefix cache) to the end of the last cached run. The engine is
  told these tokens are loaded; the blend pass fills them. Everything after
  ``until`` (an uncached tail, the question) the engine computes as usual,
  attending to the blended KV;
* the *runs*: cached token ranges inside the blend range, each with where its
  KV was stored (segment-local positions) and where it stands now. Every
  other token of the range (separators, uncached segments, a segment's
  uncached tail: the *holes*) is recomputed in every layer.

Blending is worth it only when enough tokens are reused (``min_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmcache_core.blend.segments import Segment
from lmcache_core.keys import ChunkedPrompt, TokenChunker


@dataclass(frozen=True)
class CachedRun:
    """Tokens ``[start, start + num_tokens)`` of the prompt, cached as chunks
    ``[0, num_chunks)`` of segment ``segment`` (which begins at prompt token
    ``segment_start``; the KV was stored at positions counted from there)."""

    segment: int
    segment_start: int
    start: int
    num_tokens: int
    num_chunks: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass(frozen=True)
class BlendPlan:
    """Blend tokens ``[computed, until)`` of a prompt, reusing ``runs``."""

    computed: int
    until: int
    runs: tuple[CachedRun, ...]

    @property
    def reused_tokens(self) -> int:
        return sum(r.num_tokens for r in self.runs)

    @property
    def num_tokens(self) -> int:
        return self.until - self.computed


def segment_prompt(
    chunker: TokenChunker,
    tokens: Sequence[int],
    segment: Segment,
    *,
    cache_salt: str | None = None,
    adapter: str | None = None,
) -> ChunkedPrompt:
    """The chunks of one segment, keyed on its tokens alone (position-independent).

    The salt and adapter seed the chain as for prefixes, so tenants and LoRA
    adapters never share segment KV either.
    """
    return chunker.chunk(
        tokens[segment.start : segment.end],
        cache_salt=cache_salt,
        adapter=adapter,
        include_partial=True,
        partial_multiple=1,
    )


def plan_blend(
    segments: Sequence[Segment],
    prompts: Sequence[ChunkedPrompt],
    hits: Sequence[int],
    *,
    num_tokens: int,
    computed: int,
    min_tokens: int,
) -> BlendPlan | None:
    """The blend plan of a prompt of ``num_tokens`` tokens, or None to compute it all.

    ``hits[i]`` is how many leading chunks of ``prompts[i]`` (segment ``i``)
    the cache holds; ``computed`` is how many leading tokens the engine holds
    already. The engine computes at least the last prompt token, so the range
    ends before it; a run cut by ``computed`` or by that end keeps its part.
    """
    limit = num_tokens - 1
    runs: list[CachedRun] = []
    for i, (seg, prompt, hit) in enumerate(zip(segments, prompts, hits, strict=True)):
        if hit <= 0:
            continue
        start = seg.start
        end = min(seg.start + prompt.end(hit - 1), limit)
        lo = max(start, computed)
        if end <= lo:
            continue
        # Chunks are loaded whole; tokens of a run before ``computed`` are skipped at load.
        chunks = -(-(end - start) // prompt.chunk_size)
        runs.append(CachedRun(i, seg.start, lo, end - lo, min(hit, chunks)))
    if not runs:
        return None
    plan = BlendPlan(computed, max(r.end for r in runs), tuple(runs))
    if plan.reused_tokens < min_tokens:
        return None
    return plan
