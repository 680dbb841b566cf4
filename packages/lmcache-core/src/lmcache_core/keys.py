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
import hashlib
import json
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

from lmcache_core.errors import TokenError
from lmcache_core.layout import KVLayout

KEY_SCHEME_VERSION = 2
_SEED_PREFIX = b"lmcache-key\x00v2\x00"
_BLOCK = struct.Struct("<II")  # tokens in the chunk, multimodal items starting in it
_ITEM = struct.Struct("<QQI")  # offset, length, identifier length
NAMESPACE_DIGEST_SIZE = 16


def _hasher(algorithm: str) -> Any:
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            from blake3 import blake3
        except ImportError:
            raise ImportError(
                "hash_algorithm=blake3 needs the blake3 package: pip install 'lmcache-core[blake3]'"
            ) from None
        return blake3()
    if algorithm == "xxh3_128":
        import xxhash

        return xxhash.xxh3_128()
    raise ValueError(f"unknown hash algorithm {algorithm!r}; use sha256, blake3 or xxh3_128")


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


@dataclass(frozen=True)
class KeyNamespace:
    """Everything that makes two caches' KV incompatible, hashed to 16 bytes."""

    model: str
    layout: KVLayout
    chunk_size: int = 256
    world_size: int = 1
    rank: int = 0
    hash_algorithm: str = "sha256"
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("KeyNamespace.model must name the model (e.g. its path or repo id)")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size})")
        _hasher(self.hash_algorithm)  # fail early on an unknown or missing algorithm

    def canonical(self) -> dict[str, Any]:
        return {
            "scheme": KEY_SCHEME_VERSION,
            "hash": self.hash_algorithm,
            "model": self.model,
            "layout": self.layout.fingerprint(),
            "chunk_size": self.chunk_size,
            "world_size": self.world_size,
            "rank": self.rank,
            "extra": [list(kv) for kv in self.extra],
        }

    @cached_property
    def digest(self) -> bytes:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).digest()[:NAMESPACE_DIGEST_SIZE]

    def for_rank(self, rank: int) -> KeyNamespace:
        return KeyNamespace(
            self.model,
            self.layout,
            self.chunk_size,
            self.world_size,
            rank,
            self.hash_algorithm,
            self.extra,
        )


class CacheKey(bytes):
    """A chunk's key: the 16-byte namespace digest followed by the prefix hash.

    A ``bytes`` subclass, so it is immutable, hashes once (CPython caches a
    bytes hash) and costs little to build: a 128K-token lookup makes 512.
    """

    __slots__ = ()

    @classmethod
    def of(cls, namespace: bytes, prefix: bytes) -> CacheKey:
        """The key of ``prefix`` in ``namespace`` (``CacheKey(namespace + prefix)`` is the same)."""
        if len(namespace) != NAMESPACE_DIGEST_SIZE or not prefix:
            raise ValueError(
                f"a CacheKey is a {NAMESPACE_DIGEST_SIZE}-byte namespace and a non-empty prefix"
            )
        return cls(namespace + prefix)

    @property
    def namespace(self) -> bytes:
        return bytes(self[:NAMESPACE_DIGEST_SIZE])

    @property
    def prefix(self) -> bytes:
        return bytes(self[NAMESPACE_DIGEST_SIZE:])

    def __reduce__(self) -> tuple[Any, ...]:
        return (CacheKey, (bytes(self),))

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> CacheKey:
        if len(data) <= NAMESPACE_DIGEST_SIZE:
            raise ValueError(f"a CacheKey is more than {NAMESPACE_DIGEST_SIZE} bytes long")
        return cls(bytes(data))

    def hex(self, *args: Any) -> str:  # type: ignore[override]
        """Stable text form, for file names and remote keys: ``v1-<namespace>-<prefix>``."""
        if args:
            return super().hex(*args)
        return f"v{KEY_SCHEME_VERSION}-{self.namespace.hex()}-{self.prefix.hex()}"

    @classmethod
    def from_hex(cls, text: str) -> CacheKey:
        try:
            version, ns, prefix = text.split("-")
            if version != f"v{KEY_SCHEME_VERSION}":
                raise ValueError(version)
            return cls.of(bytes.fromhex(ns), bytes.fromhex(prefix))
        except ValueError:
            raise ValueError(f"{text!r} is not a v{KEY_SCHEME_VERSION} cache key") from None

    def __repr__(self) -> str:
        return f"CacheKey({self.hex()[:24]}...)"


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
        if cache_salt or adapter:
            h = _seed(self.hash_algorithm, cache_salt, adapter)
        else:
            h = self._plain.copy()
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
        if cache_salt or adapter:
            h = _seed(self.hash_algorithm, cache_salt, adapter)
        else:
            h = self._plain.copy()
        step = self.chunk_size * 4
        for off in range(0, start * 4, step):
            h.update(self._full_header)
            h.update(data[off : off + step])
        out = []
        for n in lengths:
            t = h.copy()
            t.update(n.to_bytes(4, "little") + b"\x00\x00\x00\x00")
            t.update(data[start * 4 : (start + n) * 4])
            out.append(t.digest())
        return out

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


def keys_for(namespace: KeyNamespace, spans: Sequence[ChunkSpan]) -> list[CacheKey]:
    ns = namespace.digest
    return [CacheKey(ns + s.prefix) for s in spans]
