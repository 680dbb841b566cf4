"""The serde protocol and the frame every serde writes.

Bytes read back from a disk or a remote server are data only: no pickle, no
code, and no length trusted before it is checked. Every frame starts with a
fixed header carrying the key, the sizes and a checksum of the payload, so a
torn write, a flipped bit or a value stored under the wrong key is detected
and becomes a miss, never wrong KV.
"""

from __future__ import annotations

import contextvars
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import xxhash

from lmcache_core.errors import LMCacheError
from lmcache_core.plugin_api import INHERITED_API_VERSION

MAGIC = b"LMCK"
FRAME_VERSION = 1
# magic, version, serde id, flags, num_tokens, raw bytes, payload bytes, key length | checksum
_FIELDS = struct.Struct("<4sHBBIQQH")
_HEADER = struct.Struct("<4sHBBIQQH8s")
HEADER_SIZE = _HEADER.size
_NO_CHECKSUM = b"\x00" * 8

#: True while a MAC covers every byte of the frame being encoded or decoded
#: (set by :class:`~lmcache_core.backends.frame_store.FrameStore` around an
#: authenticated tier's serde calls, per thread).
MAC_COVERED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lmcache_mac_covered", default=False
)


class SerdeError(LMCacheError):
    """A frame is malformed or corrupt; the reader treats it as a miss."""


@dataclass(frozen=True)
class ChunkHeader:
    serde_id: int
    num_tokens: int
    raw_nbytes: int
    payload_nbytes: int
    key: bytes
    checksum: bytes = b""

    def _fields(self) -> bytes:
        return _FIELDS.pack(
            MAGIC,
            FRAME_VERSION,
            self.serde_id,
            0,
            self.num_tokens,
            self.raw_nbytes,
            self.payload_nbytes,
            len(self.key),
        )

    def compute_checksum(self, payload: bytes | memoryview) -> bytes:
        """xxh3-64 over every header field, the key and the payload: any flipped bit shows.

        Zero while a MAC covers the whole frame (an authenticated tier's
        envelope, see :mod:`lmcache_core.auth`): the MAC checks the same bytes.
        """
        if MAC_COVERED.get():
            return _NO_CHECKSUM
        h = xxhash.xxh3_64()
        h.update(self._fields())
        h.update(self.key)
        h.update(payload)
        return h.digest()

    def sealed(self, payload: bytes | memoryview) -> ChunkHeader:
        """This header with the checksum of ``payload`` filled in."""
        return ChunkHeader(
            self.serde_id,
            self.num_tokens,
            self.raw_nbytes,
            self.payload_nbytes,
            self.key,
            self.compute_checksum(payload),
        )

    def verify(self, payload: bytes | memoryview) -> None:
        if MAC_COVERED.get():
            return  # the envelope's MAC over every byte of the frame was checked already
        if self.compute_checksum(payload) != self.checksum:
            raise SerdeError("checksum mismatch: the stored bytes are corrupt")

    def pack(self) -> bytes:
        return self._fields() + self.checksum + self.key

    @classmethod
    def for_reader(
        cls, frame: bytes | memoryview, serde: Serde, key: bytes, out_nbytes: int
    ) -> tuple[ChunkHeader, memoryview]:
        """The header and payload of ``frame``, checked for a reader of ``key`` into
        ``out_nbytes`` bytes with ``serde`` (every serde's shared checks, checksum included)."""
        view = memoryview(frame).cast("B")
        header = cls.unpack(view, max_raw_nbytes=out_nbytes)
        if header.serde_id != serde.serde_id:
            raise SerdeError(f"frame was written by serde id {header.serde_id}, not {serde.name}")
        if header.key != key:
            raise SerdeError("frame was stored under another key")
        if header.raw_nbytes != out_nbytes:
            raise SerdeError(
                f"frame holds {header.raw_nbytes} bytes, the reader expects {out_nbytes}"
            )
        payload = view[header.size :]
        if payload.nbytes != header.payload_nbytes:
            raise SerdeError(
                f"frame is truncated: {payload.nbytes} of {header.payload_nbytes} payload bytes"
            )
        header.verify(payload)
        return header, payload

    @property
    def size(self) -> int:
        return HEADER_SIZE + len(self.key)

    @classmethod
    def unpack(cls, data: bytes | memoryview, *, max_raw_nbytes: int) -> ChunkHeader:
        if len(data) < HEADER_SIZE:
            raise SerdeError(f"frame of {len(data)} bytes is shorter than its header")
        magic, version, serde_id, flags, ntok, raw, payload, klen, checksum = _HEADER.unpack_from(
            data
        )
        if magic != MAGIC:
            raise SerdeError("not an lmcache chunk frame (bad magic)")
        if version != FRAME_VERSION:
            raise SerdeError(f"frame version {version} is not supported (expected {FRAME_VERSION})")
        if flags:
            raise SerdeError(f"frame has unknown flags {flags:#x}")
        if raw > max_raw_nbytes:
            raise SerdeError(f"frame claims {raw} bytes, more than the {max_raw_nbytes} expected")
        if len(data) < HEADER_SIZE + klen:
            raise SerdeError("frame is truncated inside its key")
        key = bytes(data[HEADER_SIZE : HEADER_SIZE + klen])
        return cls(serde_id, ntok, raw, payload, key, checksum)


class Serde(ABC):
    """Turns a chunk's bytes into a frame and back."""

    #: The name users give in ``remote_serde``.
    name: ClassVar[str]
    #: One byte stored in every frame, so a frame is never decoded by the wrong serde.
    serde_id: ClassVar[int]
    #: The plugin API this serde is written for (see :mod:`lmcache_core.plugin_api`).
    api_version: ClassVar[int] = INHERITED_API_VERSION
    #: The ``extra_config`` keys this serde reads: name -> one line on what it does.
    extra_config_keys: ClassVar[Mapping[str, str]] = {}

    @abstractmethod
    def encode(self, key: bytes, num_tokens: int, data: memoryview) -> list[bytes | memoryview]:
        """The frame for ``data`` as a list of buffers to write in order (no join needed)."""

    @abstractmethod
    def decode(self, frame: bytes | memoryview, key: bytes, out: memoryview) -> int:
        """Check ``frame`` and write the chunk's bytes into ``out``.

        Returns the number of tokens. Raises :class:`SerdeError` if the frame
        is corrupt, was stored under another key, or does not fit ``out``.
        """
