"""Partial-chunk keys answered by the first blocks of a longer stored chunk.

lmcache stores KV in chunks (256 tokens by default) while engines cache in
blocks (16 tokens on GPUs, 128 on vLLM's CPU backend). A prompt that shares
only the first blocks of a stored chunk with an earlier one (a shared system
prompt that ends inside a chunk, a document followed by another question) has
a chunk key of its own there, which misses: upstream LMCache then recomputes
up to ``chunk_size - 1`` tokens that the cache holds; vLLM's own prefix cache
recomputes less than a block.

The stored chunk's first ``n`` tokens have exactly the KV a partial chunk of
``n`` tokens at the same place would have (their keys hash the same tokens
after the same prefix, and KV depends on nothing after it). So whoever stores
a chunk may also register the keys of its block-multiple prefixes
(:meth:`lmcache_core.keys.TokenChunker.inner_prefixes`) as *aliases*: key of
the partial chunk -> (key of the stored chunk, ``n``). A lookup whose last key
misses tries the alias, and a load then reads the stored chunk and writes its
first ``n`` tokens only (writers touch the blocks of their write range alone,
so the chunk may reach past the request's blocks; no copy cuts it).

The map is this process's, filled by whoever has the token ids (the vLLM
connector's scheduler sends the keys with every save and every load, so a
chunk another instance stored in Redis is learnt the first time it is loaded
here). It is bounded (least recently used entries go first) and holds no KV:
an alias whose chunk was evicted is a miss.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

from lmcache_core.keys import CacheKey, ChunkSpan

if TYPE_CHECKING:
    from lmcache_core.pool import Chunk
    from lmcache_core.tier_cascade import TierCascade

#: Default bound (``max_chunk_aliases``): 131072 aliases, 34-46 MiB (one per chunk on
#: vLLM's CPU backend, 15 per chunk on GPUs: the prefixes of some 8700 chunks, 280 GB of
#: Llama-3-8B KV).
DEFAULT_MAX_ALIASES = 1 << 17


class Alias(NamedTuple):
    """The stored chunk ``target`` (``target_tokens`` long) holds this key's ``tokens`` tokens."""

    target: CacheKey
    tokens: int
    target_tokens: int


class ChunkAliases:
    """A bounded map from partial-chunk keys to the stored chunks that hold their KV."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ALIASES) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries={max_entries} must be >= 0")
        self.max_entries = max_entries
        self._map: OrderedDict[CacheKey, Alias] = OrderedDict()
        self._lock = threading.Lock()

    def add(
        self, target: CacheKey, target_tokens: int, aliases: Sequence[tuple[CacheKey, int]]
    ) -> None:
        """Record that ``target`` (``target_tokens`` tokens) holds each alias's first tokens."""
        if not self.max_entries:
            return
        for _, n in aliases:
            if not 0 < n < target_tokens:
                raise ValueError(f"an alias of {n} tokens cannot lie in a chunk of {target_tokens}")
        with self._lock:
            for key, n in aliases:
                self._map[key] = Alias(target, n, target_tokens)
                self._map.move_to_end(key)
            while len(self._map) > self.max_entries:
                self._map.popitem(last=False)

    def resolve(self, key: CacheKey) -> Alias | None:
        """The stored chunk that holds ``key``'s KV, if one was registered (not checked)."""
        with self._lock:
            alias = self._map.get(key)
            if alias is not None:
                self._map.move_to_end(key)
            return alias

    def __len__(self) -> int:
        return len(self._map)


def present_with_alias(
    cascade: TierCascade, aliases: ChunkAliases, keys: Sequence[CacheKey]
) -> tuple[int, list[CacheKey]]:
    """How many leading ``keys`` some tier holds, the last one perhaps through an alias,
    and the keys of the stored chunks that hold them (the ones to pin).

    Only the last key may be an alias: a partial chunk ends its prompt.
    """
    hits = cascade.prefix_present(list(keys))
    if keys and hits == len(keys) - 1:
        alias = aliases.resolve(keys[hits])
        if alias is not None and cascade.prefix_present([alias.target]):
            return hits + 1, [*keys[:hits], alias.target]
    return hits, list(keys[:hits])


def holders_with_alias(
    cascade: TierCascade, aliases: ChunkAliases, keys: Sequence[CacheKey]
) -> list[CacheKey | None]:
    """For independent partial-chunk ``keys``: the key of the stored chunk that holds each
    (itself, or an alias's target), or None; one presence check per tier for all."""
    out: list[CacheKey | None] = [None] * len(keys)
    for i, ok in enumerate(cascade.present(list(keys))):
        if ok:
            out[i] = keys[i]
    resolved = [(i, aliases.resolve(keys[i])) for i, k in enumerate(out) if k is None]
    found = [(i, a.target) for i, a in resolved if a is not None]
    if found:
        for (i, target), ok in zip(found, cascade.present([t for _, t in found])):
            if ok:
                out[i] = target
    return out


def get_through_alias(
    cascade: TierCascade, aliases: ChunkAliases, key: CacheKey, span: ChunkSpan
) -> tuple[Chunk, ChunkSpan] | None:
    """The stored chunk that holds partial chunk ``key`` (tokens ``span``), and the longer
    span it covers, or None. Write only ``span``'s tokens of it: writers touch the
    blocks of the write range alone, so no copy is needed to cut it."""
    alias = aliases.resolve(key)
    if alias is None or alias.tokens != span.num_tokens:
        return None
    whole = ChunkSpan(span.start, span.start + alias.target_tokens, alias.target.prefix)
    got = cascade.get_prefix([alias.target], [whole])
    return (got[0], whole) if got else None
