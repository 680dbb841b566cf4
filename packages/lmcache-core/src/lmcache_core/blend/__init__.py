"""Non-prefix KV reuse (CacheBlend), the engine-agnostic part.

* :mod:`~lmcache_core.blend.segments`: where a prompt's reusable segments are;
* :mod:`~lmcache_core.blend.plan`: segment keys (position-independent) and
  which tokens come from the cache;
* :mod:`~lmcache_core.blend.selection`: which cached tokens are recomputed;
* :mod:`~lmcache_core.blend.rope`: the RoPE shift, as the reference the
  adapters' fast paths are tested against.

The engine adapters run the partial forward pass; see docs/blending.md.
"""

from lmcache_core.blend.plan import BlendPlan, CachedRun, plan_blend, segment_prompt
from lmcache_core.blend.segments import Segment, segments_from_spans, segments_from_text
from lmcache_core.blend.selection import num_selected, select_tokens

#: Goes into the key namespace of blend chunks: their K is stored at
#: segment-local positions, in the neutral chunk format, so they never mix
#: with prefix chunks.
BLEND_KEY_FORM = ("kv_form", "blend-segment-rope0-v1")

__all__ = [
    "BLEND_KEY_FORM",
    "BlendPlan",
    "CachedRun",
    "Segment",
    "num_selected",
    "plan_blend",
    "segment_prompt",
    "segments_from_spans",
    "segments_from_text",
    "select_tokens",
]
