"""The scheduler's half of hits inside a chunk: the keys of chunks' first blocks.

The workers register, for every chunk they store or load, the keys of its
block-multiple prefixes as aliases of it (:mod:`lmcache_core.chunk_aliases`),
so that a later prompt sharing only a chunk's first blocks loads them. Only
the scheduler has the token ids to compute those keys, so it sends them with
each save and each load. Loads matter as much as saves: a chunk another
instance stored in a shared tier, or this one before a restart, is learnt
here the first time a request loads it whole.

Hashing costs about 26 microseconds per chunk with SHA-256 and 16-token
blocks, so the chunks whose keys were sent lately are remembered and not
hashed again: a popular document costs it once, not on every hit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from lmcache_core.keys import TokenChunker

from lmcache_vllm.request_keys import RequestIdentity

#: Chunks whose inner keys were sent lately (about the workers' alias map in chunks).
DEFAULT_REMEMBERED = 1 << 16


class InnerKeys:
    """Computes, once per chunk lately, the keys of its block-multiple prefixes."""

    def __init__(
        self, chunker: TokenChunker, block_size: int, remembered: int = DEFAULT_REMEMBERED
    ) -> None:
        self.chunker = chunker
        self.block_size = block_size
        self.enabled = block_size < chunker.chunk_size
        self.remembered = remembered
        self._sent: OrderedDict[bytes, None] = OrderedDict()

    def for_chunks(
        self,
        tokens: Sequence[int],
        identity: RequestIdentity | None,
        digests: Sequence[bytes],
        num_tokens: int,
        lo: int,
        hi: int,
    ) -> dict[int, list[bytes]]:
        """Chunk index -> keys of its first ``block_size``, ``2 * block_size``, ... tokens,
        for chunks ``[lo, hi)`` of a prompt of ``num_tokens`` tokens whose chunk keys are
        ``digests``; none for chunks sent lately, prompts with images, or when chunks
        are one block."""
        if not self.enabled or identity is None or identity.mm_items or not self.remembered:
            return {}
        todo = [i for i in range(lo, hi) if digests[i] not in self._sent]
        for i in range(lo, hi):
            self._remember(digests[i])
        if not todo:
            return {}
        inner = self.chunker.inner_prefixes(
            tokens[:num_tokens], range(todo[0], todo[-1] + 1), self.block_size,
            cache_salt=identity.cache_salt, adapter=identity.adapter,
        )  # fmt: skip
        wanted = set(todo)
        return {
            i: d for i, d in zip(range(todo[0], todo[-1] + 1), inner) if d and i in wanted
        }  # fmt: skip

    def _remember(self, digest: bytes) -> None:
        self._sent[digest] = None
        self._sent.move_to_end(digest)
        while len(self._sent) > self.remembered:
            self._sent.popitem(last=False)
