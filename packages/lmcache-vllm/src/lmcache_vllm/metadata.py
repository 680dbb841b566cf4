"""What the scheduler-side connector tells the workers each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmcache_core.keys import ChunkedPrompt
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from lmcache_vllm.blend.specs import BlendLoadSpec, BlendSaveSpec
from lmcache_vllm.kv_events import BlockInfo


@dataclass
class PromptRef:
    """A prompt hashed once by the scheduler: its chunks' prefix hashes."""

    chunk_size: int
    num_tokens: int
    digests: list[bytes]

    def prompt(self) -> ChunkedPrompt:
        return ChunkedPrompt(self.chunk_size, self.num_tokens, self.digests)


@dataclass
class LoadSpec:
    """Load tokens ``[load_from, load_until)`` of a request into its blocks."""

    req_id: str
    prompt: PromptRef
    block_ids: list[int]
    load_from: int
    load_until: int
    #: Tokens the scheduler's candidate lookup found past the prompt's own keys: the
    #: workers count them as lookup hits (the lookup that found them cannot).
    found_past_own_keys: int = 0
    #: As in :class:`SaveSpec`: the keys of the read chunks' first blocks.
    inner: dict[int, list[bytes]] = field(default_factory=dict)
    inner_step: int = 0


@dataclass
class SaveSpec:
    """Store the chunks of ``prompt`` (tokens computed by now) from the request's blocks."""

    req_id: str
    prompt: PromptRef
    block_ids: list[int]
    blocks: BlockInfo | None = None  # vLLM's block hashes, when KV events are on
    #: chunk index -> digests of its first ``inner_step``, ``2 * inner_step``, ... tokens:
    #: aliases of the stored chunk (lmcache_core.chunk_aliases).
    inner: dict[int, list[bytes]] = field(default_factory=dict)
    inner_step: int = 0
    #: Chunks before this one are not stored: their blocks include vLLM's null block
    #: (KV it dropped outside a sliding window), so their KV is not in the blocks.
    from_chunk: int = 0
    #: Whose quota the chunks count against on an lmcache server (a digest of cache_salt).
    tenant: str = ""


@dataclass
class LMCacheConnectorMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)
    blend_loads: list[BlendLoadSpec] = field(default_factory=list)
    blend_saves: list[BlendSaveSpec] = field(default_factory=list)
    #: A request with saves was preempted (its blocks freed, perhaps reallocated in
    #: this step): order vLLM's stream after every save copy before it writes KV.
    fence: bool = False
