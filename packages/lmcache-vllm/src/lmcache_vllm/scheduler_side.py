"""The scheduler side of the vLLM connector: lookups and per-step load/save plans.

It hashes each prompt once, asks every tensor-parallel rank how many leading
chunks it holds (the minimum counts), and tells the workers, in one metadata
object per step, which blocks to load and which computed chunks to store.
Blend requests (:mod:`lmcache_vllm.blend.scheduler`) take the same path with
their segments.

A request's ``lmcache.*`` controls are checked once, at its first hook: one
that lmcache cannot key (malformed controls, a lone surrogate in a tag or in
``cache_salt``) is served without the cache from then on, and so is a request
one of whose hooks met an lmcache error (:meth:`SchedulerSide.serve_uncached`;
the connector wraps every hook). vLLM's state stays consistent either way: a
request that fails after vLLM took tokens from lmcache gets a load that loads
nothing, so the workers report its blocks and vLLM recomputes them.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from lmcache_core.hit_sources import KINDS
from lmcache_core.keys import ChunkedPrompt, TokenChunker
from lmcache_core.request_options import epoch_salt, tenant_id

from lmcache_vllm.blend.scheduler import BlendScheduler, BlendState
from lmcache_vllm.inner_keys import InnerKeys
from lmcache_vllm.kv_events import EventGate, block_info, events_enabled
from lmcache_vllm.lookup import LookupClient
from lmcache_vllm.metadata import LMCacheConnectorMetadata, LoadSpec, PromptRef, SaveSpec
from lmcache_vllm.request_keys import RequestIdentity, request_identity
from lmcache_vllm.save_tracker import SaveTracker
from lmcache_vllm.settings import (
    async_saves,
    check_chunk_size,
    check_parallelism,
    checked_kv_spec,
    load_cache_config,
)

logger = logging.getLogger("vllm.lmcache")
#: Hit sources from nearest to farthest: a chunk counts where the farthest rank holds it.
SOURCE_ORDER = {kind: i for i, kind in enumerate(KINDS)}

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

#: Scheduler sides alive in this process (for tests and benchmark tools).
SCHEDULERS: list[SchedulerSide] = []

#: vLLM's BlockPool hands block 0 out as its null block: in a request's table it
#: stands for KV that vLLM dropped (before a sliding window), never for a request's KV.
NULL_BLOCK = 0


def kept_from(block_ids: list[int], block_size: int) -> int:
    """The first token whose block holds KV: those before sit in vLLM's null block."""
    for i, b in enumerate(block_ids):
        if b != NULL_BLOCK:
            return i * block_size
    return len(block_ids) * block_size


@dataclass
class _RequestState:
    prompt: ChunkedPrompt
    prompt_len: int
    block_ids: list[int] = field(default_factory=list)
    load: tuple[int, int] | None = None  # tokens [from, until) to load this step
    lookup_from: int = 0  # vLLM's own hit when we looked up
    saved_chunks: int = 0
    pinned: bool = False
    blend: BlendState | None = None  # a blend request (its prompt is then empty)
    tokens: list[int] = field(default_factory=list)
    request: Any = None  # vLLM's Request, kept for its block hashes when KV events are on
    hit: ChunkedPrompt | None = None  # what to load, when it ends in another prompt's tail
    identity: RequestIdentity | None = None  # salt, adapter, images: for the inner-prefix keys
    tenant: str = ""  # whose quota its stores count against on a server (its cache_salt's)


class SchedulerSide:
    """What the scheduler process does: lookups and per-step load/save plans."""

    def __init__(self, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config
        self.config = load_cache_config(extra)
        self.block_size = vllm_config.cache_config.block_size
        check_chunk_size(self.config, self.block_size)
        self.role = vllm_config.kv_transfer_config.kv_role
        #: Every layer slides: vLLM frees blocks that leave the window mid-request.
        self.sliding = False
        if kv_cache_config is not None:
            from vllm.v1.kv_cache_interface import SlidingWindowSpec

            spec = checked_kv_spec(kv_cache_config, self.config)
            self.sliding = isinstance(spec, SlidingWindowSpec)
        self.chunker = TokenChunker(self.config.chunk_size, self.config.hash_algorithm)
        check_parallelism(vllm_config)
        pc = vllm_config.parallel_config
        self.client = LookupClient(
            vllm_config.kv_transfer_config.engine_id,
            pc.tensor_parallel_size,
            self.config.blocking_timeout_secs,
        )
        self.requests: dict[str, _RequestState] = {}
        #: Requests served without the cache, decided at their first hook (controls lmcache
        #: cannot key) or at an lmcache error in one of their hooks; never tried again.
        self.uncached: set[str] = set()
        #: vLLM's own hit each request was last looked up with.
        self.asked: dict[str, int] = {}
        #: Tokens [from, until) vLLM took from lmcache for a request and expects loaded,
        #: until its load is planned: a request that fails before then is sent a load
        #: that loads nothing, so the workers report its blocks and vLLM recomputes them.
        self.promised: dict[str, tuple[int, int]] = {}
        #: (hook, error type) already logged with a traceback.
        self._failures_logged: set[tuple[str, str]] = set()
        #: Set by a cache reset (:meth:`reset_cache`); folded into every key's salt.
        self.epoch: str | None = None
        #: Saves may finish after the step (GPU): requests that had one keep their
        #: blocks when they finish until the workers report the saves done.
        self.tracker = SaveTracker(async_saves(vllm_config))
        self.events = EventGate(pc.tensor_parallel_size) if events_enabled(vllm_config) else None
        # Remember about half the chunks the workers' alias maps hold, so that keys the
        # workers have forgotten are sent again when a request next touches the chunk.
        per_chunk = max(1, self.config.chunk_size // self.block_size - 1)
        self.inner_keys = InnerKeys(
            self.chunker, self.block_size, self.config.max_chunk_aliases // per_chunk // 2
        )
        self.blend = (
            BlendScheduler(self.config, vllm_config, self.chunker)
            if self.config.enable_blending
            else None
        )
        SCHEDULERS.append(self)

    def reset_cache(self) -> bool:
        """vLLM reset the connector's cache (``reset_prefix_cache(reset_connector=True)``,
        ``pause_generation(clear_cache=True)`` around a weight update): start a new key
        epoch, so that no KV stored before, in any tier, is ever loaded here again.

        Tiers are not emptied: shared ones belong to every instance, and what this one
        stored ages out of its own by eviction. Requests planned under the old epoch
        forget their keys (a preempted one looks up again when it comes back)."""
        self.epoch = secrets.token_hex(16)
        for req_id, st in list(self.requests.items()):
            if st.pinned:
                self.client.unpin(req_id)
        self.requests.clear()
        logger.info(
            "lmcache: cache reset by vLLM; new key epoch %s: KV stored before is never "
            "loaded by this instance again",
            self.epoch,
        )
        return True

    def serve_uncached(self, req_id: str, hook: str, error: BaseException | None = None) -> None:
        """An lmcache error in ``hook`` of request ``req_id``: serve it without the cache
        from now on (its pins released, its plans forgotten). A load vLLM expects from
        it is sent as one that loads nothing (:attr:`promised`), so vLLM recomputes."""
        if error is not None:
            key = (hook, type(error).__name__)
            first = key not in self._failures_logged
            if first and len(self._failures_logged) < 256:
                self._failures_logged.add(key)
            logger.warning(
                "lmcache: %s failed for request %s (%s: %s); it is served without the cache",
                hook,
                req_id,
                type(error).__name__,
                str(error)[:200],
                exc_info=error if first else None,
            )
        self.uncached.add(req_id)
        st = self.requests.pop(req_id, None)
        if st is not None and st.pinned:
            try:
                self.client.unpin(req_id)
            except Exception:
                logger.debug("lmcache: unpinning %s failed", req_id, exc_info=True)

    def _state(self, request: Request) -> _RequestState | None:
        st = self.requests.get(request.request_id)
        if st is None:
            if request.request_id in self.uncached:
                return None  # decided at its first hook
            identity = request_identity(request)
            if identity is None:
                self.uncached.add(request.request_id)
                return None
            if self.epoch:  # after a cache reset: keys of their own
                identity = replace(identity, cache_salt=epoch_salt(identity.cache_salt, self.epoch))
            blend = self.blend.state(request, identity) if self.blend is not None else None
            if blend is not None:
                st = _RequestState(
                    prompt=ChunkedPrompt(self.config.chunk_size, 0, []),
                    prompt_len=len(request.prompt_token_ids),
                    blend=blend,
                    tokens=request.prompt_token_ids,
                    identity=identity,
                )
                self.requests[request.request_id] = st
                return st
            prompt = self.chunker.chunk(
                request.prompt_token_ids,
                cache_salt=identity.cache_salt,
                adapter=identity.adapter,
                mm_items=identity.mm_items,
                include_partial=self.config.save_unfull_chunk,
                partial_multiple=self.block_size,
            )
            st = _RequestState(
                prompt=prompt,
                prompt_len=len(request.prompt_token_ids),
                tokens=request.prompt_token_ids,
                identity=identity,
                tenant=tenant_id(getattr(request, "cache_salt", None)),
            )
            if self.events is not None:
                st.request = request
            self.requests[request.request_id] = st
        return st

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> int:
        self.asked[request.request_id] = num_computed_tokens
        if self.role == "kv_producer":
            return 0
        if getattr(request, "skip_reading_prefix_cache", False):
            return 0  # prompt logprobs: vLLM computes every token and would drop a hit
        if num_computed_tokens % self.block_size:
            # vLLM's own hit ends inside a block (its partial-block hits, made for hybrid
            # models): loads write whole blocks, so load nothing after it.
            return 0
        st = self._state(request)
        if st is not None and st.blend is not None and self.blend is not None:
            new = self.blend.matched(
                st.blend, self.client, request.request_id, st.prompt_len, num_computed_tokens
            )
            st.pinned = new > 0
            return new
        if st is None or not len(st.prompt):
            return 0
        p = st.prompt
        hits = self.client.lookup(p.chunk_size, p.num_tokens, p.digests, request.request_id)
        st.pinned = hits > 0
        hit = p.end(hits - 1) if hits else 0
        # vLLM computes at least the last prompt token; like its own prefix
        # cache, recompute the last (partial) block rather than load it.
        cap = ((st.prompt_len - 1) // self.block_size) * self.block_size
        st.hit = None
        if hits < len(p) and cap > hit:
            st.hit = self._continuation(request, p, hits, cap)
            if st.hit is not None:
                hit = st.hit.num_tokens
        hit = min(hit, cap)
        st.lookup_from = num_computed_tokens
        new = max(0, hit - num_computed_tokens)
        if new == 0 and st.pinned:
            self.client.unpin(request.request_id)
            st.pinned = False
        return new

    def _continuation(
        self, request: Request, p: ChunkedPrompt, hits: int, cap: int
    ) -> ChunkedPrompt | None:
        """The hit extended into chunk ``hits`` by whole blocks some tier holds there.

        The chunk past the hit misses when this prompt goes on otherwise than
        every stored one, yet its first blocks may be cached: a chat's next
        round repeats the last one's prompt, which stored its own trailing
        partial chunk (whole blocks of it) there; a prompt that shares a
        longer one's first blocks only finds them as the prefixes of that
        stored chunk (:mod:`lmcache_core.chunk_aliases`). Neither is this
        prompt's key, so look up the keys a partial chunk of each whole number
        of blocks would have, in one round trip; without this, up to
        ``chunk_size - block_size`` cached tokens would be recomputed.
        """
        start = p.start(hits)
        own = p.end(hits) - start
        lengths = list(range(self.block_size, own, self.block_size))
        lengths = [n for n in lengths if start + n <= cap][::-1]  # longest first
        if not lengths:
            return None
        identity = self.requests[request.request_id].identity
        if identity is None:
            return None
        tails = self.chunker.continuations(
            request.prompt_token_ids, hits, lengths,
            cache_salt=identity.cache_salt, adapter=identity.adapter, mm_items=identity.mm_items,
        )  # fmt: skip
        # A tail's key hashes everything before it: looked up alone, each is one key.
        # The head goes along once, so that its pins survive this lookup's.
        head = p.digests[:hits]
        found = self.client.lookup_prompts(
            p.chunk_size, [head, *([t] for t in tails)], request.request_id
        )
        if found[0] < hits:  # the head went meanwhile: keep the first answer
            return None
        for n, tail, got in zip(lengths, tails, found[1:]):
            if got:
                return ChunkedPrompt(p.chunk_size, start + n, [*head, tail])
        return None

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens > 0:  # first: whatever fails below, vLLM expects this load
            lo = self.asked.get(request.request_id, 0)
            self.promised[request.request_id] = (lo, lo + num_external_tokens)
        st = self._state(request)
        if st is None:
            return
        if num_external_tokens > 0 and st.blend is not None:
            st.blend.pending = st.blend.plan
        elif num_external_tokens > 0:
            st.load = (st.lookup_from, st.lookup_from + num_external_tokens)
        elif st.pinned:  # vLLM took none of the hit (its own cache covered it, or a
            self.client.unpin(request.request_id)  # request that reads no cache): free now
            st.pinned = False

    def hit_sources(self, request: Request, num_tokens: int) -> dict[str, int]:
        """The tokens of the load just planned for ``request``, per kind of tier that holds
        them (:mod:`lmcache_core.hit_sources`), as every rank's last lookup found them
        (a chunk counts where the farthest rank has it); {} when that is not known."""
        st = self.requests.get(request.request_id)
        if st is None or st.load is None or st.blend is not None or num_tokens <= 0:
            return {}
        answers = self.client.sources(request.request_id)
        p = st.hit or st.prompt  # the held keys: its chunks, in order
        lo, hi = st.load
        out: dict[str, int] = {}
        for i in range(len(p)):
            n = min(p.end(i), hi) - max(p.start(i), lo)
            if n <= 0:
                continue
            kinds = [r[i] for r in answers if i < len(r)]
            if not kinds or len(kinds) != len(answers):
                return {}
            kind = max(kinds, key=lambda k: SOURCE_ORDER.get(k, len(SOURCE_ORDER)))
            out[kind] = out.get(kind, 0) + n
        return out if sum(out.values()) == num_tokens else {}

    def build_connector_meta(self, so: SchedulerOutput) -> LMCacheConnectorMetadata:
        """This step's plans: each request planned on its own, so an lmcache error in one
        serves that request without the cache and never the others (nor fails vLLM)."""
        meta = LMCacheConnectorMetadata()
        preempted = getattr(so, "preempted_req_ids", None) or set()
        try:
            if self.tracker.fence_needed(preempted):
                meta.fence = True  # their blocks may be rewritten in this very step
            elif self.sliding and self.tracker.saving_any():
                meta.fence = True  # blocks that left the window may be handed out in this step
        except Exception as e:  # cannot tell: fencing is always safe
            logger.warning("lmcache: planning the step's fence failed (%s); fencing", e)
            meta.fence = True
        for new in so.scheduled_new_reqs:
            block_ids = new.block_ids[0] if new.block_ids else []
            try:
                st = self.requests.get(new.req_id)
                if st is not None:
                    st.block_ids = list(block_ids)
                    self._plan_load(new.req_id, st, meta)
                    done = new.num_computed_tokens + so.num_scheduled_tokens[new.req_id]
                    self._plan_save(new.req_id, st, done, meta)
            except Exception as e:
                self.serve_uncached(new.req_id, "build_connector_meta", e)
            self._settle_promise(new.req_id, block_ids, meta)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_ids = cached.new_block_ids[i]
            try:
                st = self.requests.get(req_id)
                if st is not None:
                    if req_id in cached.resumed_req_ids:
                        st.block_ids = list(new_ids[0]) if new_ids else []
                    elif new_ids:
                        st.block_ids.extend(new_ids[0])
                    # A preempted request comes back here, not among the new ones, and
                    # may have looked up (and been promised) tokens again.
                    self._plan_load(req_id, st, meta)
                    done = cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0)
                    self._plan_save(req_id, st, done, meta)
            except Exception as e:
                self.serve_uncached(req_id, "build_connector_meta", e)
            if req_id in self.promised:
                self._settle_promise(req_id, new_ids[0] if new_ids else [], meta)
        return meta

    def _settle_promise(
        self, req_id: str, block_ids: list[int], meta: LMCacheConnectorMetadata
    ) -> None:
        """A load vLLM expects for ``req_id`` that no plan made (an lmcache error on the
        way): a load of nothing, which the workers report short, so vLLM recomputes."""
        promised = self.promised.pop(req_id, None)
        if promised is None:
            return
        lo, hi = promised
        logger.warning(
            "lmcache: the load of tokens [%d, %d) of %s was not planned; vLLM recomputes them",
            lo,
            hi,
            req_id,
        )
        empty = PromptRef(self.config.chunk_size, 0, [])
        meta.loads.append(LoadSpec(req_id, empty, list(block_ids), lo, hi))

    def _plan_load(self, req_id: str, st: _RequestState, meta: LMCacheConnectorMetadata) -> None:
        if st.blend is not None and self.blend is not None:
            spec = self.blend.load_spec(req_id, st.blend, st.tokens, st.block_ids)
            if spec is not None:
                meta.blend_loads.append(spec)
                self.promised.pop(req_id, None)
                st.pinned = False
            return
        if st.load is None:
            return
        lo, hi = st.load
        lo = max(lo, kept_from(st.block_ids, self.block_size))
        if lo >= hi:  # all of it before the window: vLLM needs none of it
            self.promised.pop(req_id, None)
            st.load = None
            if st.pinned:
                self.client.unpin(req_id)
                st.pinned = False
            return
        ref = self._ref(st, len(st.prompt))
        spec = LoadSpec(req_id, ref, list(st.block_ids), lo, hi)
        if st.hit is not None:  # it ends in a candidate key: a stored tail or a chunk's blocks
            spec.prompt = PromptRef(st.hit.chunk_size, st.hit.num_tokens, st.hit.digests)
            head = len(st.hit) - 1
            spec.found_past_own_keys = st.hit.num_tokens - (st.prompt.end(head - 1) if head else 0)
        # The chunks this load reads: the workers learn their first blocks' keys too.
        p = spec.prompt.prompt()
        read = sum(1 for i in range(len(p)) if p.start(i) < hi)
        spec.inner = self.inner_keys.for_chunks(
            st.tokens, st.identity, p.digests, p.num_tokens, 0, read
        )
        spec.inner_step = self.block_size
        meta.loads.append(spec)
        self.promised.pop(req_id, None)
        st.load = None
        st.pinned = False

    def _ref(self, st: _RequestState, chunks: int) -> PromptRef:
        p = st.prompt
        return PromptRef(p.chunk_size, p.end(chunks - 1) if chunks else 0, p.digests[:chunks])

    def _plan_save(
        self, req_id: str, st: _RequestState, computed: int, meta: LMCacheConnectorMetadata
    ) -> None:
        if self.role == "kv_consumer":
            return
        if st.identity is not None and st.identity.skip_save and self.role != "kv_producer":
            return  # lmcache.skip_save; a P/D producer's save is the transfer, so it stays
        if st.blend is not None and self.blend is not None:
            if computed >= st.prompt_len:
                bspec = self.blend.save_spec(req_id, st.blend, st.block_ids)
                if bspec is not None:
                    meta.blend_saves.append(bspec)
                    self.tracker.planned([req_id])
            return
        if computed >= st.prompt_len:
            ready = len(st.prompt)  # prefill done: every chunk, the partial one too
        else:
            ready = min(len(st.prompt), computed // self.config.chunk_size)
        if ready > st.saved_chunks:
            ref = self._ref(st, ready)
            blocks = None
            if st.request is not None:
                blocks = block_info(st.request, ref.num_tokens, self.block_size)
            spec = SaveSpec(req_id, ref, list(st.block_ids), blocks, tenant=st.tenant)
            spec.from_chunk = -(-kept_from(st.block_ids, self.block_size) // self.config.chunk_size)
            if self.sliding:  # blocks of chunks planned before may have left the window
                spec.from_chunk = max(spec.from_chunk, st.saved_chunks)
            p = st.prompt
            spec.inner = self.inner_keys.for_chunks(
                st.tokens, st.identity, p.digests, p.num_tokens, st.saved_chunks, ready
            )
            spec.inner_step = self.block_size
            meta.saves.append(spec)
            st.saved_chunks = ready
            self.tracker.planned([req_id])

    def request_finished(self, request: Request) -> bool:
        """Forget the request; True when vLLM must keep its blocks until the workers
        report its saves done (``get_finished``): the same rule on both sides, so it
        is answered first, whatever the clean-up meets."""
        req_id = request.request_id
        delay = self.tracker.delay(req_id)
        self.uncached.discard(req_id)
        self.asked.pop(req_id, None)
        self.promised.pop(req_id, None)
        st = self.requests.pop(req_id, None)
        if st is not None and st.pinned:
            try:
                self.client.unpin(req_id)
            except Exception as e:  # the pins expire after pin_timeout
                logger.warning("lmcache: unpinning finished request %s failed (%s)", req_id, e)
        return delay

    def close(self) -> None:
        self.client.close()
        if self in SCHEDULERS:
            SCHEDULERS.remove(self)
