"""The wire format between an ``lmcache server`` and its clients (the control plane).

KV bytes never cross this socket: they live in the server's shared-memory
arena, which every client maps (the data plane). What crosses it is small:
prefix digests, token spans, lease numbers, counts.

A frame is ``u32 length | u8 op | u32 sequence | body`` (little-endian;
``length`` counts what follows it). Replies carry the request's sequence and
the op ``REPLY`` or ``ERROR`` (body: a UTF-8 message). Ops whose requests set
the top bit of ``op`` (``ONE_WAY``) get no reply.

Everything read from the socket is hostile until checked: the frame length is
bounded before anything is read, every field is read through :class:`Reader`,
which checks each length against what is left and against its own bound, and
nothing is ever unpickled. A client that sends a malformed frame gets an
``ERROR`` reply naming the problem, or is disconnected when the stream cannot
be resynchronised; the server goes on.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from enum import IntEnum

#: Bumped when a frame or an op's body changes incompatibly; HELLO refuses other versions.
PROTOCOL_VERSION = 1
#: The longest frame either side accepts (a HELLO with its JSON, or a step's batch).
MAX_FRAME = 8 << 20
#: The longest digest (a chunk's prefix hash) on the wire.
MAX_DIGEST = 64
#: The longest owner (request id) or other string on the wire, in bytes.
MAX_STRING = 1024
#: The most items in one list on the wire.
MAX_ITEMS = 1 << 16

_HEADER = struct.Struct("<IBI")
#: A leased chunk in a FETCH or ALLOCATE reply: lease, arena offset, bytes, tokens, start, end.
CHUNK_RECORD = struct.Struct("<QQIIII")
ONE_WAY = 0x80


class Op(IntEnum):
    HELLO = 1
    LOOKUP = 2
    LOOKUP_CHAINS = 3
    PREFIX_PRESENT = 4
    HIT_KINDS = 5
    UNPIN = 6
    ADD_ALIASES = 7
    FETCH = 8
    ALLOCATE = 9
    COMMIT = 10
    RELEASE = 11
    REMOVE = 12
    FLUSH = 13
    STATUS = 14
    PING = 15
    REPLY = 100
    ERROR = 101


class ProtocolError(Exception):
    """A frame or field that breaks the wire format (the message says which)."""


class ServerError(Exception):
    """The server refused a request; the message is the server's."""


class Writer:
    """Builds a frame body field by field."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def u8(self, v: int) -> Writer:
        self._parts.append(struct.pack("<B", v))
        return self

    def u32(self, v: int) -> Writer:
        self._parts.append(struct.pack("<I", v))
        return self

    def u64(self, v: int) -> Writer:
        self._parts.append(struct.pack("<Q", v))
        return self

    def f64(self, v: float) -> Writer:
        self._parts.append(struct.pack("<d", v))
        return self

    def blob(self, b: bytes | memoryview) -> Writer:
        self._parts.append(struct.pack("<I", len(b)))
        self._parts.append(bytes(b))
        return self

    def digest(self, d: bytes) -> Writer:
        if not 0 < len(d) <= MAX_DIGEST:
            raise ProtocolError(f"a digest of {len(d)} bytes cannot be sent")
        self._parts.append(struct.pack("<B", len(d)))
        self._parts.append(bytes(d))
        return self

    def digests(self, ds: Sequence[bytes]) -> Writer:
        if any(not 0 < len(d) <= MAX_DIGEST for d in ds):
            raise ProtocolError(f"digests must be 1 to {MAX_DIGEST} bytes")
        self._parts.append(struct.pack("<I", len(ds)))
        self._parts.append(b"".join(bytes((len(d),)) + d for d in ds))
        return self

    def raw(self, b: bytes) -> Writer:
        """Bytes laid out by the caller (records of a fixed struct)."""
        self._parts.append(b)
        return self

    def string(self, s: str) -> Writer:
        b = s.encode("utf-8", "surrogatepass")
        if len(b) > MAX_STRING:
            raise ProtocolError(f"a string of {len(b)} bytes is longer than {MAX_STRING}")
        self._parts.append(struct.pack("<H", len(b)))
        self._parts.append(b)
        return self

    def u64s(self, vs: Sequence[int]) -> Writer:
        self.u32(len(vs))
        self._parts.append(struct.pack(f"<{len(vs)}Q", *vs))
        return self

    def u32s(self, vs: Sequence[int]) -> Writer:
        self.u32(len(vs))
        self._parts.append(struct.pack(f"<{len(vs)}I", *vs))
        return self

    def body(self) -> bytes:
        return b"".join(self._parts)


class Reader:
    """Reads a frame body field by field; every length is checked before it is used."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self._buf = memoryview(buf)
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        if n < 0 or self._pos + n > len(self._buf):
            raise ProtocolError(
                f"frame too short: {n} bytes wanted at offset {self._pos} of {len(self._buf)}"
            )
        v = self._buf[self._pos : self._pos + n]
        self._pos += n
        return v

    def u8(self) -> int:
        return int(self._take(1)[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self._take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self._take(8))[0])

    def f64(self) -> float:
        return float(struct.unpack("<d", self._take(8))[0])

    def count(self, limit: int = MAX_ITEMS) -> int:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"a list of {n} items is longer than {limit}")
        return n

    def blob(self, limit: int = MAX_FRAME) -> bytes:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"a field of {n} bytes is longer than {limit}")
        return bytes(self._take(n))

    def digest(self) -> bytes:
        n = self.u8()
        if not 0 < n <= MAX_DIGEST:
            raise ProtocolError(f"a digest of {n} bytes (1 to {MAX_DIGEST} allowed)")
        return bytes(self._take(n))

    def digests(self) -> list[bytes]:
        n = self.count()
        buf, pos, out = self._buf, self._pos, []
        end = len(buf)
        for _ in range(n):
            if pos >= end:
                raise ProtocolError("frame too short for its digests")
            k = buf[pos]
            if not 0 < k <= MAX_DIGEST or pos + 1 + k > end:
                raise ProtocolError(f"a digest of {k} bytes (1 to {MAX_DIGEST}, within the frame)")
            out.append(bytes(buf[pos + 1 : pos + 1 + k]))
            pos += 1 + k
        self._pos = pos
        return out

    def records(self, fmt: struct.Struct, limit: int = MAX_ITEMS) -> list[tuple[int, ...]]:
        """A count, then that many fixed-size records of ``fmt``."""
        n = self.count(limit)
        raw = self._take(n * fmt.size)
        return list(fmt.iter_unpack(raw))

    def string(self) -> str:
        n = int(struct.unpack("<H", self._take(2))[0])
        if n > MAX_STRING:
            raise ProtocolError(f"a string of {n} bytes is longer than {MAX_STRING}")
        try:
            return bytes(self._take(n)).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"a string that is not UTF-8 ({e.reason})") from None

    def u64s(self) -> list[int]:
        n = self.count()
        return list(struct.unpack(f"<{n}Q", self._take(8 * n)))

    def u32s(self) -> list[int]:
        n = self.count()
        return list(struct.unpack(f"<{n}I", self._take(4 * n)))

    def end(self) -> None:
        """The body must be used up: trailing bytes are a malformed frame."""
        if self._pos != len(self._buf):
            raise ProtocolError(f"{len(self._buf) - self._pos} unexpected bytes at the end")


# --------------------------------------------------------------------------- framing


def frame(op: int, seq: int, body: bytes) -> bytes:
    if len(body) + 5 > MAX_FRAME:
        raise ProtocolError(f"a frame of {len(body)} bytes is longer than {MAX_FRAME}")
    return _HEADER.pack(len(body) + 5, op, seq) + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from ``sock``; ConnectionError when the peer closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError("the peer closed the connection")
        got += k
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    """``(op, sequence, body)`` of the next frame; the length is checked before reading."""
    head = recv_exact(sock, _HEADER.size)
    length, op, seq = _HEADER.unpack(head)
    if length < 5 or length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes (5 to {MAX_FRAME} allowed)")
    return op, seq, recv_exact(sock, length - 5)
