"""``FrameStore``: the base of tiers that keep each chunk as one opaque value under a name.

Redis, S3 and the shared filesystem differ only in how they move named
values; everything else is here, once: the name of a key, encoding with the
configured serde, and the careful way back: a value is checked (header, key,
sizes, checksum) before one byte of it reaches a chunk, a value that fails is
a miss, counted, and deleted, and a value written by another serde (another
instance's ``remote_serde``) is decoded by that serde.

Every byte read back is hostile until checked: ``_read`` is told the largest
value that can be a frame and must not read more (an oversized value is a
counted miss and is deleted, never a tier failure or a 64 MiB allocation for a
2 KiB chunk). With a deployment secret (:mod:`lmcache_core.auth`) every frame
is sealed in an authenticated envelope, optionally encrypted; a value without
a valid tag is a miss, counted as forged, and deleted.

A third party's tier for another store subclasses this and writes five
methods: ``_read``, ``_write``, ``_exists``, ``_delete`` and ``_names``.
"""

from __future__ import annotations

import functools
import logging
from abc import abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar

from lmcache_core.auth import ENVELOPE_MAGIC, ForgedFrameError, FrameSealer, warn_unauthenticated
from lmcache_core.backends.base import BackendContext, ChunkAllocator, StorageBackend
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.plugins import SERDES, installed_names, load_plugin
from lmcache_core.serdes.base import MAC_COVERED, ChunkHeader, Serde, SerdeError
from lmcache_core.serdes.naive import NaiveSerde

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.pool import Chunk

logger = logging.getLogger(__name__)

#: A frame to write, as buffers to send in order.
FrameParts = list["bytes | memoryview"]


class Oversized:
    """What ``_read`` returns for a value larger than the limit it was given (not read)."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def __repr__(self) -> str:
        return f"Oversized({self.nbytes})"


#: Room for the header, key and envelope around a chunk's bytes, and for a
#: compressor's worst case on incompressible data (zstd and lz4 add < 1/128).
_FRAME_SLACK = 4096


@functools.cache
def serde_for_id(serde_id: int) -> Serde | None:
    """The installed serde that writes frames with ``serde_id`` (None if none is installed)."""
    for name in installed_names(SERDES):
        try:
            cls = load_plugin(SERDES, name)
        except Exception:  # a broken third-party plugin must not break reads
            continue
        if getattr(cls, "serde_id", None) == serde_id:
            return cls()
    return None


class FrameStore(StorageBackend):
    """Chunks as named frames in some store. Subclasses move the frames."""

    #: A store whose ``_write`` sends each frame as it gets it sets this; ``_write``
    #: then receives an iterator that encodes (checksum or MAC) a frame when asked,
    #: so the next frame is encoded while the previous one is on its way.
    streams_writes: ClassVar[bool] = False

    def __init__(
        self,
        *,
        serde: Serde | None = None,
        metrics: Metrics | None = None,
        max_chunk_bytes: int = 1 << 31,
        name_prefix: str = "lmcache:",
        sealer: FrameSealer | None = None,
    ) -> None:
        self.serde = serde if serde is not None else NaiveSerde()
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_chunk_bytes = max_chunk_bytes
        self.name_prefix = name_prefix
        self.sealer = sealer
        self._written = 0
        self._warned_sealed = False

    @property
    def max_value_bytes(self) -> int:
        """The largest value that can be a frame of this store: no more is ever read."""
        return self.max_chunk_bytes + self.max_chunk_bytes // 64 + _FRAME_SLACK

    # ------------------------------------------------------------------ what subclasses write

    @abstractmethod
    def _read(self, names: list[str], limit: int) -> list[bytes | memoryview | Oversized | None]:
        """The values stored under ``names`` (None where missing).

        A value larger than ``limit`` bytes is not read: return ``Oversized``
        for it (check the size first: STRLEN, stat, a bounded read).
        """

    @abstractmethod
    def _write(self, items: Iterable[tuple[str, FrameParts]]) -> list[bool]:
        """Store each value unless its name exists already; True where stored afterwards."""

    @abstractmethod
    def _exists(self, names: list[str]) -> list[bool]:
        """Which names hold a value."""

    @abstractmethod
    def _delete(self, names: list[str]) -> int:
        """Delete ``names``; how many existed."""

    @abstractmethod
    def _names(self) -> Iterator[str]:
        """Every name under ``name_prefix``."""

    # ------------------------------------------------------------------ names

    def name_of(self, key: CacheKey) -> str:
        return f"{self.name_prefix}{key.hex()}"

    def key_of(self, name: str) -> CacheKey | None:
        if not name.startswith(self.name_prefix):
            return None
        try:
            return CacheKey.from_hex(name[len(self.name_prefix) :])
        except ValueError:
            return None

    # ------------------------------------------------------------------ the protocol

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        if not keys:
            return []
        return self._exists([self.name_of(k) for k in keys])

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        if not keys:
            return []
        names = [self.name_of(k) for k in keys]
        values = self._read(names, self.max_value_bytes)
        out: list[Chunk | None] = []
        bad: list[str] = []
        nbytes = 0
        for key, name, value in zip(keys, names, values):
            chunk = None
            if isinstance(value, Oversized):
                logger.warning(
                    "%s tier: value %s is %d bytes, more than a frame can be; deleted",
                    self.name,
                    name,
                    value.nbytes,
                )
                self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                bad.append(name)
            elif value is not None:
                try:
                    chunk = self._decode(key, value, allocator)
                except ForgedFrameError as e:
                    logger.warning(
                        "%s tier: value %s is not authentic (%s); deleted", self.name, name, e
                    )
                    self.metrics.inc("lmcache:num_forged_chunks", tier=self.name)
                    bad.append(name)
                except SerdeError as e:
                    if self.sealer is None and _is_sealed(value):
                        self._sealed_without_secret()
                    else:
                        logger.warning(
                            "%s tier: value %s is unusable (%s); deleted", self.name, name, e
                        )
                        self.metrics.inc("lmcache:num_corrupt_chunks", tier=self.name)
                        bad.append(name)
            if chunk is not None:
                nbytes += chunk.nbytes
            out.append(chunk)
        if bad:
            try:
                self._delete(bad)
            except Exception:
                logger.warning("%s tier: deleting bad values failed", self.name, exc_info=True)
        if nbytes:
            self.metrics.inc("lmcache:retrieved_bytes", nbytes, tier=self.name)
        return out

    def _sealed_without_secret(self) -> None:
        """An authenticated frame and no secret here: a miss, and the frame is left alone."""
        self.metrics.inc("lmcache:num_failures", tier=self.name, op="no_secret")
        if not self._warned_sealed:
            self._warned_sealed = True
            logger.warning(
                "%s tier holds authenticated frames but this instance has no secret: "
                "every read is a miss (set LMCACHE_AUTH_SECRET or auth_secret_file)",
                self.name,
            )

    def _decode(
        self, key: CacheKey, value: bytes | memoryview, allocator: ChunkAllocator
    ) -> Chunk | None:
        kb = key.to_bytes()
        covered = None
        if self.sealer is not None:
            value = self.sealer.open(kb, value)
            covered = MAC_COVERED.set(True)
        try:
            return self._decode_frame(kb, key, value, allocator)
        finally:
            if covered is not None:
                MAC_COVERED.reset(covered)

    def _decode_frame(
        self, kb: bytes, key: CacheKey, value: bytes | memoryview, allocator: ChunkAllocator
    ) -> Chunk | None:
        header = ChunkHeader.unpack(value, max_raw_nbytes=self.max_chunk_bytes)
        if header.key != kb:
            raise SerdeError("value was stored under another key")
        serde = self.serde if header.serde_id == self.serde.serde_id else None
        if serde is None:
            serde = serde_for_id(header.serde_id)
            if serde is None:
                raise SerdeError(f"no installed serde writes frames with id {header.serde_id}")
        chunk = allocator(key, header.num_tokens, header.raw_nbytes)
        if chunk is None:
            return None  # no memory to read into: a miss, not corruption
        try:
            serde.decode(value, kb, chunk.view)
        except BaseException:
            chunk.release()
            raise
        return chunk

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        if not chunks:
            return []
        lazy = ((self.name_of(c.key), self._encode(c)) for c in chunks)
        ok = self._write(lazy if self.streams_writes else list(lazy))
        stored = sum(c.nbytes for c, good in zip(chunks, ok) if good)
        self._written += stored
        if stored:
            self.metrics.inc("lmcache:stored_bytes", stored, tier=self.name)
        return ok

    def _encode(self, chunk: Chunk) -> FrameParts:
        kb = chunk.key.to_bytes()
        if self.sealer is None:
            return self.serde.encode(kb, chunk.num_tokens, chunk.view)
        covered = MAC_COVERED.set(True)  # the envelope's MAC replaces the serde's checksum
        try:
            parts = self.serde.encode(kb, chunk.num_tokens, chunk.view)
        finally:
            MAC_COVERED.reset(covered)
        return self.sealer.seal(kb, parts)

    def remove(self, keys: Sequence[CacheKey]) -> int:
        if not keys:
            return 0
        return self._delete([self.name_of(k) for k in keys])

    def keys(self) -> Iterator[CacheKey]:
        for name in self._names():
            key = self.key_of(name)
            if key is not None:
                yield key

    @property
    def used_bytes(self) -> int:
        """Bytes this process has written (the store is shared: others write too)."""
        return self._written


def _is_sealed(value: bytes | memoryview) -> bool:
    return bytes(memoryview(value)[: len(ENVELOPE_MAGIC)]) == ENVELOPE_MAGIC


def frame_bytes(parts: FrameParts) -> bytes | memoryview:
    """One buffer for a frame (no copy when it is one part already)."""
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


def sealer_for(config: CacheConfig, context: BackendContext, tier: str) -> FrameSealer | None:
    """The sealer of a shared tier: authenticated with the deployment secret, else None.

    Without a secret the tier works, warns loudly at start and says so in
    ``lmcache:tier_authenticated``.
    """
    if context.secret is None:
        if config.remote_encryption:
            raise ConfigError(
                ["remote_encryption needs the deployment secret: set LMCACHE_AUTH_SECRET "
                 "or auth_secret_file"]
            )  # fmt: skip
        warn_unauthenticated(tier)
        context.metrics.set("lmcache:tier_authenticated", 0, tier=tier)
        return None
    context.metrics.set("lmcache:tier_authenticated", 1, tier=tier)
    return FrameSealer(context.secret, encrypt=config.remote_encryption)


def check_serde_name(name: str) -> Serde:
    """The serde named ``name`` (``remote_serde``), built."""
    return load_plugin(SERDES, name)()
