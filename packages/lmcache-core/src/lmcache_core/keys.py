"""Chunk keys: prefix-chained hashes of token ids inside a namespace.

Key scheme v2 (pinned by golden vectors in the tests; changing it is a new
scheme version, never an edit). v1 keyed tokens and the salt only, so the
same text under two LoRA adapters, or with two images behind identical
placeholder tokens, shared KV; v2 keys everything that changes the KV:

* token ids become little-endian uint32 bytes, once per request;
* a running hash is seeded with ``b"lmcache-key\\x00v2\\x00" + algorithm + b"\\x00"``
  followed by two length-prefixed fields (4-byte little-endian length, then
  UTF-8 bytes; empty when absent): the ``cache_salt`` and the ``adapter``
  (the LoRA adapter's name, as vLLM's own block hashes use it);
* chunk ``i`` adds a *block* to the running hash: ``u32 num_tokens``,
  ``u32 num_items``, the multimodal items whose placeholder range starts in
  this chunk (each ``u64 offset, u64 length, u32 len(identifier),
  identifier``: the engine's content hash of the image/audio and where it
  stands), then the chunk's token bytes. Every block is self-delimiting, so
  two different inputs never give the same byte stream;
* the prefix hash of chunk ``i`` is the digest after its block. It thus
  depends on every token and item before it (an item is covered by every
  chunk from the one it starts in): a lookup walks chunks in order and stops
  at the first miss, which yields the longest cached prefix, and text before
  an image is shared by prompts with other images;
* a :class:`CacheKey` pairs that prefix hash with the 16-byte digest of a
  :class:`KeyNamespace` (model, KV layout fingerprint, chunk size,
  tensor-parallel world size and rank, scheme and algorithm), so KV of another
  model, dtype, layout or rank can never be returned.

Nothing here depends on ``PYTHONHASHSEED``, the process or the machine.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

from lmcache_core.cache_key import (
    KEY_SCHEME_VERSION,
    NAMESPACE_DIGEST_SIZE,
    CacheKey,
    KeyNamespace,
)
from lmcache_core.cache_key import hasher as _hasher
from lmcache_core.errors import TokenError

__all__ = [
    "KEY_SCHEME_VERSION",
    "NAMESPACE_DIGEST_SIZE",
    "CacheKey",
    "ChunkSpan",
    "ChunkedPrompt",
    "KeyNamespace",
    "MultimodalItem",
    "TokenChunker",
    "keys_for",
    "token_bytes",
]

_SEED_PREFIX = b"lmcache-key\x00v2\x00"
_BLOCK = struct.Struct("<II")  # tokens in the chunk, multimodal items starting in it
_ITEM = struct.Struct("<QQI")  # offset, length, identifier length


def token_bytes(tokens: Sequence[int] | bytes | memoryview | Any) -> memoryview:
    """Token ids as little-endian uint32 bytes, converted once per request.

    Accepts a list or tuple of ints, an ``array('I')``, a numpy integer array,
    or bytes already in this format.
    """
    if isinstance(tokens, (bytes, bytearray, memoryview)):
        mv = memoryview(tokens).cast("B")
        if mv.nbytes % 4:
            raise TokenError(f"token bytes must be a multiple of 4 long, got {mv.nbytes}")
        return mv
    if isinstance(tokens, array.array) and tokens.typecode == "I" and tokens.itemsize == 4:
        arr = tokens
    elif hasattr(tokens, "dtype") and hasattr(tokens, "astype"):  # numpy without importing it
        if tokens.dtype.kind not in "iu":
            raise TokenError(f"token ids must be integers, got an array of {tokens.dtype}")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 1 << 32):
            raise TokenError("token ids must lie in [0, 2**32)")
        return memoryview(tokens.astype("<u4", copy=False).tobytes())
    else:
        try:
            arr = array.array("I", tokens)
        except (OverflowError, TypeError) as e:
            raise TokenError(f"token ids must be integers in [0, 2**32): {e}") from None
    if sys.byteorder != "little":
        arr = array.array("I", arr)
        arr.byteswap()
    return memoryview(arr).cast("B")


class ChunkSpan(NamedTuple):
    """Tokens ``[start, end)`` of a prompt, and the prefix hash of ``[0, end)``."""

    start: int
    end: int
    prefix: bytes

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class ChunkedPrompt:
    """The prefix hashes of a prompt's chunks; chunk ``i`` covers ``[start(i), end(i))``."""

    __slots__ = ("chunk_size", "digests", "num_tokens")

    def __init__(self, chunk_size: int, num_tokens: int, digests: list[bytes]) -> None:
        self.chunk_size = chunk_size
        self.num_tokens = num_tokens
        self.digests = digests

    def __len__(self) -> int:
        return len(self.digests)

    def start(self, i: int) -> int:
        return i * self.chunk_size

    def end(self, i: int) -> int:
        return min((i + 1) * self.chunk_size, self.num_tokens)

    def spans(self) -> list[ChunkSpan]:
        return [ChunkSpan(self.start(i), self.end(i), d) for i, d in enumerate(self.digests)]

    def keys(self, namespace: KeyNamespace) -> list[CacheKey]:
        ns = namespace.digest
        return [CacheKey(ns + d) for d in self.digests]


class MultimodalItem(NamedTuple):
    """A multimodal input of a prompt: the engine's hash of its content, and where it stands.

    ``offset`` and ``length`` are the token range of its placeholder tokens
    (vLLM's ``PlaceholderRange``); ``identifier`` is the content hash the
    engine computed (vLLM's ``mm_hash``/``identifier``). Identical placeholder
    tokens with another image give another identifier, so other keys.
    """

    identifier: str
    offset: int
    length: int


def _field(text: str | None) -> bytes:
    raw = (text or "").encode()
    return len(raw).to_bytes(4, "little") + raw


def _seed(algorithm: str, cache_salt: str | None, adapter: str | None = None) -> Any:
    h = _hasher(algorithm)
    h.update(_SEED_PREFIX + algorithm.encode() + b"\x00" + _field(cache_salt) + _field(adapter))
    return h


def _items_by_chunk(
    items: Sequence[MultimodalItem], chunk_size: int, num_tokens: int
) -> dict[int, bytes]:
    """The encoded items of each chunk that one starts in (items past the prompt dropped)."""
    out: dict[int, list[bytes]] = {}
    for item in sorted(items, key=lambda m: (m.offset, m.length, m.identifier)):
        offset, length = int(item.offset), int(item.length)
        if offset < 0 or length < 0:
            raise TokenError(f"multimodal item {item.identifier!r} has a negative offset or length")
        if offset >= num_tokens:
            continue
        ident = str(item.identifier).encode()
        out.setdefault(offset // chunk_size, []).append(
            _ITEM.pack(offset, length, len(ident)) + ident
        )
    return {i: _BLOCK.pack(0, len(recs))[4:] + b"".join(recs) for i, recs in out.items()}


class TokenChunker:
    """Splits token ids into chunks and computes their prefix hashes.

    Engine-independent and namespace-independent: a scheduler computes the
    spans once and forms keys for every tensor-parallel rank from them.
    """

    def __init__(self, chunk_size: int, hash_algorithm: str = "sha256") -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size={chunk_size} must be positive")
        self.chunk_size = chunk_size
        self.hash_algorithm = hash_algorithm
        self._plain = _seed(hash_algorithm, None)
        self._full_header = struct.pack("<II", chunk_size, 0)

    def chunk(
        self,
        tokens: Sequence[int] | bytes | memoryview | Any,
        *,
        cache_salt: str | None = None,
        adapter: str | None = None,
        mm_items: Sequence[MultimodalItem] = (),
        include_partial: bool = True,
        partial_multiple: int = 1,
        max_tokens: int | None = None,
    ) -> ChunkedPrompt:
        """Prefix hashes of the chunks of ``tokens`` (at most ``max_tokens`` of them).

        ``cache_salt`` (a tenant), ``adapter`` (a LoRA adapter's name) and
        ``mm_items`` (multimodal inputs) change the KV, so they change every
        key they reach. The trailing partial chunk, if included, is cut to a
        multiple of ``partial_multiple`` tokens (engines that move whole blocks only).
        """
        data = token_bytes(tokens)
        n = data.nbytes // 4
        if max_tokens is not None:
            n = max(0, min(n, max_tokens))
        if partial_multiple > 1:
            full = (n // self.chunk_size) * self.chunk_size
            n = full + ((n - full) // partial_multiple) * partial_multiple
        h = self._seed(cache_salt, adapter)
        items = _items_by_chunk(mm_items, self.chunk_size, n) if mm_items else {}
        step = self.chunk_size * 4
        full_bytes = (n // self.chunk_size) * step
        digests: list[bytes] = []
        append, update, digest = digests.append, h.update, h.digest
        header = self._full_header
        for i, off in enumerate(range(0, full_bytes, step)):
            if items and i in items:
                update(header[:4] + items[i])
            else:
                update(header)
            update(data[off : off + step])
            append(digest())
        if include_partial and n * 4 > full_bytes:
            i = full_bytes // step
            rest = n - full_bytes // 4
            update(rest.to_bytes(4, "little") + items.get(i, b"\x00\x00\x00\x00"))
            update(data[full_bytes : n * 4])
            append(digest())
        else:
            n = full_bytes // 4
        return ChunkedPrompt(self.chunk_size, n, digests)

    def continuations(
        self,
        tokens: Sequence[int] | bytes | memoryview | Any,
        full_chunks: int,
        lengths: Sequence[int],
        *,
        cache_salt: str | None = None,
        adapter: str | None = None,
        mm_items: Sequence[MultimodalItem] = (),
    ) -> list[bytes]:
        """The digest a partial chunk of each of ``lengths`` tokens would have right after
        the first ``full_chunks`` chunks of ``tokens``.

        Another, shorter prompt that stopped there stored its trailing partial
        chunk under that digest (``chunk``'s last one with ``max_tokens`` =
        start + length): the previous round of a chat, whose prompt the next
        round extends. One pass over the full chunks serves every length.
        """
        data = token_bytes(tokens)
        start = full_chunks * self.chunk_size
        if any(n <= 0 or n >= self.chunk_size or start + n > data.nbytes // 4 for n in lengths):
            raise TokenError(
                f"continuation lengths {list(lengths)} do not fit after {start} tokens"
            )
        if mm_items:  # items' markers depend on where the prompt ends: hash each one whole
            return [
                self.chunk(tokens, cache_salt=cache_salt, adapter=adapter, mm_items=mm_items,
                           max_tokens=start + n).digests[-1]
                for n in lengths
            ]  # fmt: skip
        h = self._seed(cache_salt, adapter)
        step = self.chunk_size * 4
        for off in range(0, start * 4, step):
            h.update(self._full_header)
            h.update(data[off : off + step])
        return [_tail_digest(h, data, start, n) for n in lengths]

    def inner_prefixes(
        self,
        tokens: Sequence[int] | bytes | memoryview | Any,
        chunks: range,
        step: int,
        *,
        cache_salt: str | None = None,
        adapter: str | None = None,
    ) -> list[list[bytes]]:
        """For each chunk ``i`` in ``chunks``: the digests of its first ``step``,
        ``2 * step``, ... tokens (each shorter than the chunk), as partial chunks.

        A stored chunk holds the KV of every prefix of it, so a prompt that
        shares only its first blocks (a shared system prompt that ends inside
        a chunk, a RAG prefix with another suffix) can load those blocks, if
        it can find them: these are the keys it looks them up by (see
        :class:`lmcache_core.chunk_aliases.ChunkAliases`). Chunks past the
        end of ``tokens`` get none. Prompts with multimodal items have none
        (their partial keys depend on where the prompt ends).
        """
        if step <= 0:
            raise ValueError(f"step={step} must be positive")
        data = token_bytes(tokens)
        n = data.nbytes // 4
        h = self._seed(cache_salt, adapter)
        out: list[list[bytes]] = []
        for i in range(chunks.stop):
            lo = i * self.chunk_size
            hi = min(lo + self.chunk_size, n)
            if i >= chunks.start:
                out.append([_tail_digest(h, data, lo, m) for m in range(step, hi - lo, step)])
            if hi - lo < self.chunk_size:
                out.extend([] for _ in range(max(chunks.start, i + 1), chunks.stop))
                break
            h.update(self._full_header)
            h.update(data[lo * 4 : hi * 4])
        return out

    def _seed(self, cache_salt: str | None, adapter: str | None) -> Any:
        if cache_salt or adapter:
            return _seed(self.hash_algorithm, cache_salt, adapter)
        return self._plain.copy()

    def spans(
        self,
        tokens: Sequence[int] | bytes | memoryview | Any,
        *,
        cache_salt: str | None = None,
        adapter: str | None = None,
        mm_items: Sequence[MultimodalItem] = (),
        include_partial: bool = True,
        max_tokens: int | None = None,
    ) -> list[ChunkSpan]:
        """Chunk spans of ``tokens`` (at most ``max_tokens`` of them), in order."""
        return self.chunk(
            tokens,
            cache_salt=cache_salt,
            adapter=adapter,
            mm_items=mm_items,
            include_partial=include_partial,
            max_tokens=max_tokens,
        ).spans()


def _tail_digest(h: Any, data: memoryview, start: int, n: int) -> bytes:
    """The digest of a partial chunk of ``n`` tokens at ``start``, given the hash before it."""
    t = h.copy()
    t.update(n.to_bytes(4, "little") + b"\x00\x00\x00\x00")  # no multimodal items
    t.update(data[start * 4 : (start + n) * 4])
    return t.digest()


def keys_for(namespace: KeyNamespace, spans: Sequence[ChunkSpan]) -> list[CacheKey]:
    ns = namespace.digest
    return [CacheKey(ns + s.prefix) for s in spans]
