"""The scheduler side of blending: find segments, look them up, plan loads and stores.

A request is a *blend request* when it has segments: explicit token spans
in ``kv_transfer_params["blend_segments"]`` (``[[start, end], ...]``), or
else the configured separator (``blend_special_str``) in its text. Requests
without segments, with a LoRA adapter or multimodal inputs go the prefix way
(the blend pass runs the base model's text layers only).

The separator is found in text, not in token ids, because it tokenizes
differently next to different words. The prompt's token ids are decoded with
the model's tokenizer and encoded again with offsets; if that round trip does
not give the same ids (a prompt not made by this tokenizer), the request is
not blended; explicit spans always work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from lmcache_core.blend import (
    BlendPlan,
    Segment,
    plan_blend,
    segment_prompt,
    segments_from_spans,
    segments_from_text,
)
from lmcache_core.blend.selection import SelectionPolicy
from lmcache_core.config import CacheConfig
from lmcache_core.errors import TokenError
from lmcache_core.keys import ChunkedPrompt, TokenChunker

from lmcache_vllm.blend.specs import BlendLoadSpec, BlendSaveSpec, RunRef, SegmentRef
from lmcache_vllm.request_keys import RequestIdentity

logger = logging.getLogger("vllm.lmcache")

#: The ``kv_transfer_params`` key of explicit segments.
SEGMENTS_PARAM = "blend_segments"


@dataclass
class BlendState:
    """A blend request as the scheduler follows it."""

    segments: list[Segment]
    prompts: list[ChunkedPrompt]
    hits: list[int] = field(default_factory=list)
    plan: BlendPlan | None = None
    pending: BlendPlan | None = None  # promised to vLLM, not yet sent to the workers
    saved: bool = False


class BlendScheduler:
    def __init__(self, config: CacheConfig, vllm_config: Any, chunker: TokenChunker) -> None:
        self.config = config
        self.chunker = chunker
        self.model_config = vllm_config.model_config
        self._tokenizer: Any = None
        self._warned: set[str] = set()
        # The workers rank by the question's attention: send them the prompt's tail.
        self.wants_question = SelectionPolicy.from_config(config).needs_question

    # ------------------------------------------------------------------ segments

    def state(self, request: Any, identity: RequestIdentity) -> BlendState | None:
        """The request's segments and their keys; None if it is not a blend request."""
        if identity.adapter or identity.mm_items:
            return None
        tokens = request.prompt_token_ids
        segments = self._segments(request, tokens)
        if not segments:
            return None
        prompts = [
            segment_prompt(self.chunker, tokens, s, cache_salt=identity.cache_salt)
            for s in segments
        ]
        return BlendState(segments, prompts)

    def _segments(self, request: Any, tokens: list[int]) -> list[Segment]:
        params = getattr(request, "kv_transfer_params", None) or {}
        spans = params.get(SEGMENTS_PARAM) if isinstance(params, dict) else None
        if spans is not None:
            try:
                return segments_from_spans(spans, len(tokens))
            except TokenError as e:
                logger.warning("lmcache: request %s: %s; not blended", request.request_id, e)
                return []
        return self.segments_by_separator(tokens)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            mc = self.model_config
            self._tokenizer = AutoTokenizer.from_pretrained(
                mc.tokenizer,
                revision=getattr(mc, "tokenizer_revision", None),
                trust_remote_code=bool(getattr(mc, "trust_remote_code", False)),
            )
            if not getattr(self._tokenizer, "is_fast", False):
                self._warn("slow", "the tokenizer gives no offsets: pass blend_segments instead")
        return self._tokenizer

    def segments_by_separator(self, tokens: list[int]) -> list[Segment]:
        tok = self.tokenizer()
        if not getattr(tok, "is_fast", False):
            return []
        text = tok.decode(tokens, skip_special_tokens=False)
        if self.config.blend_special_str not in text:
            return []
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != list(tokens):
            self._warn(
                "roundtrip",
                "a prompt's tokens do not come back from its decoded text, so its separators "
                f"cannot be placed; pass explicit spans in kv_transfer_params[{SEGMENTS_PARAM!r}]",
            )
            return []
        return segments_from_text(text, enc["offset_mapping"], self.config.blend_special_str)

    def _warn(self, key: str, text: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("lmcache: blending: %s", text)

    # ------------------------------------------------------------------ lookup

    def matched(
        self, st: BlendState, client: Any, req_id: str, num_tokens: int, num_computed: int
    ) -> int:
        """Tokens vLLM may take as loaded: the blend range past what it holds."""
        chains = [p.digests for p in st.prompts]
        st.hits = client.lookup_chains(self.chunker.chunk_size, chains, req_id)
        st.plan = plan_blend(
            st.segments,
            st.prompts,
            st.hits,
            num_tokens=num_tokens,
            computed=num_computed,
            min_tokens=self.config.blend_min_tokens,
        )
        if st.plan is None:
            client.unpin(req_id)
            return 0
        return st.plan.until - num_computed

    # ------------------------------------------------------------------ per-step specs

    def load_spec(
        self, req_id: str, st: BlendState, tokens: list[int], block_ids: list[int]
    ) -> BlendLoadSpec | None:
        plan, st.pending = st.pending, None
        if plan is None:
            return None
        cs = self.chunker.chunk_size
        runs = []
        for r in plan.runs:
            seg = st.segments[r.segment]
            digests = st.prompts[r.segment].digests[: r.num_chunks]
            runs.append(RunRef(seg.start, seg.end, r.start, r.num_tokens, digests))
        return BlendLoadSpec(
            req_id,
            list(block_ids),
            plan.computed,
            plan.until,
            list(tokens[plan.computed : plan.until]),
            cs,
            runs,
            list(tokens[plan.until :]) if self.wants_question else [],
        )

    def save_spec(self, req_id: str, st: BlendState, block_ids: list[int]) -> BlendSaveSpec | None:
        """Once the prompt is computed: the segments whose chunks the lookup did not find."""
        if st.saved:
            return None
        st.saved = True
        hits = st.hits or [0] * len(st.segments)
        todo = [
            SegmentRef(s.start, s.end, p.digests)
            for s, p, h in zip(st.segments, st.prompts, hits)
            if h < len(p)
        ]
        if not todo:
            return None
        return BlendSaveSpec(req_id, list(block_ids), self.chunker.chunk_size, todo)
