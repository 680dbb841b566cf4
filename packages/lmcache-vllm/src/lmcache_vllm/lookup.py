"""The lookup path from vLLM's scheduler to the workers that hold the cache.

The scheduler and the workers are different objects and, with tensor
parallelism, different processes. Every worker serves lookups for its own
rank; the scheduler hashes the prompt once and sends the chunks' prefix
hashes (32 bytes a chunk, not the tokens) to every rank. A hit counts only up
to the shortest prefix that *every* rank holds.

Two transports, one protocol:

* in-process: a worker in the same process (vLLM's uni-process executor, the
  default for one CPU or GPU) registers itself, and the scheduler calls it
  directly;
* a Unix socket per rank, named after vLLM's engine id, for workers in other
  processes. Frames are length-prefixed binary; no pickle.

A rank that does not answer within ``blocking_timeout_secs`` counts as a miss:
the request is computed, never failed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmcache_core.hit_sources import KINDS

logger = logging.getLogger(__name__)

_OP_LOOKUP = 1
_OP_UNPIN = 2
_OP_PING = 3
_OP_LOOKUP_CHAINS = 4  # blend segments' chains
_OP_LOOKUP_PROMPTS = 5  # prompt chains (a prompt's own keys), several at once
_OP_SOURCES = 6  # where the chunks an owner's last lookup found are
#: Hit sources on the wire (:mod:`lmcache_core.hit_sources` names), 0: unknown.
SOURCE_CODES = {kind: i + 1 for i, kind in enumerate(KINDS)}
_SOURCE_NAMES = {v: k for k, v in SOURCE_CODES.items()}
_HDR = struct.Struct("<IB")  # payload length, op
_LOOKUP = struct.Struct("<IIIBH")  # chunk_size, num_tokens, n_digests, digest_size, owner_len
_CHAINS = struct.Struct("<IIBH")  # chunk_size, n_chains, digest_size, owner_len
_U32 = struct.Struct("<I")
MAX_FRAME = 64 << 20

#: ``lookup(chunk_size, num_tokens, digests, owner) -> leading chunks held``.
LookupFn = Callable[[int, int, list[bytes], str], int]
UnpinFn = Callable[[str], None]
#: ``lookup_chains(chunk_size, chains, owner) -> leading chunks held of each chain``.
ChainsFn = Callable[[int, list[list[bytes]], str], list[int]]
#: ``sources(owner) -> where each chunk its last lookup found is``.
SourcesFn = Callable[[str], list[str]]


def _no_sources(owner: str) -> list[str]:
    return []


def _no_chains(chunk_size: int, chains: list[list[bytes]], owner: str) -> list[int]:
    return [0] * len(chains)


#: A rank's in-process functions: lookup, unpin, blend chains, prompt chains (the
#: last two optional: a rank registered without them answers misses).
_LOCAL: dict[tuple[str, int], tuple[Any, ...]] = {}
_LOCAL_LOCK = threading.Lock()


#: Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100


def socket_path(engine_id: str, rank: int) -> str:
    """The socket of ``rank``; the same in the scheduler's and the worker's process."""
    base = os.environ.get("LMCACHE_SOCKET_DIR") or tempfile.gettempdir()
    safe = "".join(c for c in engine_id if c.isalnum() or c in "-_")[:48]
    path = str(Path(base) / f"lmcache-{safe}-tp{rank}.sock")
    if len(path.encode()) > _MAX_SOCKET_PATH:
        # A deep LMCACHE_SOCKET_DIR: fall back to a short, still deterministic name.
        digest = hashlib.sha256(path.encode()).hexdigest()[:20]
        path = str(Path(tempfile.gettempdir()) / f"lmcache-{digest}.sock")
    return path


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed the lookup socket")
        buf += part
    return bytes(buf)


def _encode_lookup(chunk_size: int, num_tokens: int, digests: list[bytes], owner: str) -> bytes:
    o = owner.encode()
    size = len(digests[0]) if digests else 0
    if any(len(d) != size for d in digests):
        raise ValueError("all digests of a prompt have the same size")
    return _LOOKUP.pack(chunk_size, num_tokens, len(digests), size, len(o)) + o + b"".join(digests)


def _decode_lookup(payload: bytes) -> tuple[int, int, list[bytes], str]:
    if len(payload) < _LOOKUP.size:
        raise ValueError("lookup frame too short")
    chunk_size, num_tokens, n, size, olen = _LOOKUP.unpack_from(payload)
    off = _LOOKUP.size
    if len(payload) != off + olen + n * size:
        raise ValueError("lookup frame length does not match its header")
    owner = payload[off : off + olen].decode()
    off += olen
    digests = [payload[off + i * size : off + (i + 1) * size] for i in range(n)]
    return chunk_size, num_tokens, digests, owner


def _encode_chains(chunk_size: int, chains: list[list[bytes]], owner: str) -> bytes:
    o = owner.encode()
    flat = [d for c in chains for d in c]
    size = len(flat[0]) if flat else 0
    if any(len(d) != size for d in flat):
        raise ValueError("all digests have the same size")
    head = _CHAINS.pack(chunk_size, len(chains), size, len(o)) + o
    return head + b"".join(_U32.pack(len(c)) for c in chains) + b"".join(flat)


def _decode_chains(payload: bytes) -> tuple[int, list[list[bytes]], str]:
    if len(payload) < _CHAINS.size:
        raise ValueError("chain lookup frame too short")
    chunk_size, n, size, olen = _CHAINS.unpack_from(payload)
    off = _CHAINS.size
    if len(payload) < off + olen + 4 * n:
        raise ValueError("chain lookup frame too short for its header")
    owner = payload[off : off + olen].decode()
    off += olen
    counts = [_U32.unpack_from(payload, off + 4 * i)[0] for i in range(n)]
    off += 4 * n
    if len(payload) != off + sum(counts) * size:
        raise ValueError("chain lookup frame length does not match its header")
    chains = []
    for c in counts:
        chains.append([payload[off + i * size : off + (i + 1) * size] for i in range(c)])
        off += c * size
    return chunk_size, chains, owner


class LookupServer:
    """Serves one rank's lookups, in process and on a Unix socket."""

    def __init__(
        self,
        engine_id: str,
        rank: int,
        lookup: LookupFn,
        unpin: UnpinFn,
        lookup_chains: ChainsFn = _no_chains,
        lookup_prompts: ChainsFn = _no_chains,
        sources: SourcesFn = _no_sources,
    ) -> None:
        self.key = (engine_id, rank)
        self.path = socket_path(engine_id, rank)
        self._lookup, self._unpin, self._sources = lookup, unpin, sources
        self._chains = {_OP_LOOKUP_CHAINS: lookup_chains, _OP_LOOKUP_PROMPTS: lookup_prompts}
        with _LOCAL_LOCK:
            _LOCAL[self.key] = (lookup, unpin, lookup_chains, lookup_prompts, sources)
        self._closed = False
        self._sock: socket.socket | None = None
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            self._sock = sock
        except OSError as e:
            # Lookups from other processes will miss; the engine still serves requests.
            logger.error(
                "lmcache: cannot serve lookups on %s (%s); other processes will miss", self.path, e
            )
            return
        self._thread = threading.Thread(target=self._accept, name="lmcache-lookup", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    length, op = _HDR.unpack(_recv_exact(conn, _HDR.size))
                    if length > MAX_FRAME:
                        raise ValueError(f"frame of {length} bytes is too large")
                    payload = _recv_exact(conn, length)
                    if op in self._chains:
                        chunk_size, chains, owner = _decode_chains(payload)
                        counts = self._chains[op](chunk_size, chains, owner)
                        conn.sendall(
                            _U32.pack(len(counts)) + b"".join(_U32.pack(c) for c in counts)
                        )
                        continue
                    if op == _OP_SOURCES:
                        codes = [SOURCE_CODES.get(s, 0) for s in self._sources(payload.decode())]
                        conn.sendall(_U32.pack(len(codes)) + b"".join(_U32.pack(c) for c in codes))
                        continue
                    if op == _OP_LOOKUP:
                        chunk_size, ntok, digests, owner = _decode_lookup(payload)
                        result = self._lookup(chunk_size, ntok, digests, owner)
                    elif op == _OP_UNPIN:
                        self._unpin(payload.decode())
                        result = 0
                    elif op == _OP_PING:
                        result = 0
                    else:
                        raise ValueError(f"unknown op {op}")
                    conn.sendall(_U32.pack(result))
                except ConnectionError:
                    return
                except Exception:
                    logger.exception("bad lookup request; closing the connection")
                    return

    def close(self) -> None:
        self._closed = True
        with _LOCAL_LOCK:
            _LOCAL.pop(self.key, None)
        if self._sock is None:
            return
        try:
            self._sock.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


class LookupClient:
    """The scheduler's view of every rank's cache."""

    def __init__(self, engine_id: str, world_size: int, timeout_s: float) -> None:
        self.engine_id = engine_id
        self.world_size = world_size
        self.timeout_s = timeout_s
        self._socks: dict[int, socket.socket] = {}
        self._lock = threading.Lock()
        self._last_warning = 0.0

    def _call(self, rank: int, op: int, payload: bytes) -> int:
        return int(_U32.unpack(self._request(rank, op, payload, 1))[0])

    def _request(self, rank: int, op: int, payload: bytes, n_words: int | None) -> bytes:
        """Send one frame; read ``n_words`` u32 back (None: a count, then that many)."""
        sock = self._socks.get(rank)
        for attempt in (0, 1):
            try:
                if sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.settimeout(self.timeout_s)
                    sock.connect(socket_path(self.engine_id, rank))
                    self._socks[rank] = sock
                sock.sendall(_HDR.pack(len(payload), op) + payload)
                if n_words is None:
                    n = _U32.unpack(_recv_exact(sock, _U32.size))[0]
                    if n > MAX_FRAME // 4:
                        raise ConnectionError(f"lookup reply of {n} words is too large")
                    return _recv_exact(sock, 4 * n)
                return _recv_exact(sock, 4 * n_words)
            except (OSError, ConnectionError):
                self._socks.pop(rank, None)
                if sock is not None:
                    sock.close()
                sock = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _min_over_ranks(self, ask: Callable[[int, Any], list[int]], best: list[int]) -> list[int]:
        """Element-wise minimum of every rank's answer to ``ask(rank, local)``: a rank's
        in-process functions, or None for one behind its socket. A rank that fails to
        answer makes it all misses."""
        with self._lock:
            for rank in range(self.world_size):
                try:
                    got = ask(rank, _LOCAL.get((self.engine_id, rank)))
                    if len(got) != len(best):
                        raise ValueError(f"rank {rank} answered {len(got)} of {len(best)} counts")
                except Exception:
                    self._warn(rank)
                    return [0] * len(best)
                best = [min(b, int(g)) for b, g in zip(best, got)]
                if not any(best):
                    break
        return best

    def lookup(self, chunk_size: int, num_tokens: int, digests: list[bytes], owner: str) -> int:
        """Leading chunks held by every rank (pinned on each for ``owner``)."""
        if not digests:
            return 0
        payload: list[bytes] = []  # encoded once, for the first rank behind a socket

        def ask(rank: int, local: Any) -> list[int]:
            if local is not None:
                return [local[0](chunk_size, num_tokens, digests, owner)]
            if not payload:
                payload.append(_encode_lookup(chunk_size, num_tokens, digests, owner))
            return [self._call(rank, _OP_LOOKUP, payload[0])]

        return self._min_over_ranks(ask, [len(digests)])[0]

    def lookup_chains(self, chunk_size: int, chains: list[list[bytes]], owner: str) -> list[int]:
        """Leading chunks of each blend chain held by every rank (pinned on each for ``owner``)."""
        return self._chains_call(_OP_LOOKUP_CHAINS, 2, chunk_size, chains, owner)

    def lookup_prompts(self, chunk_size: int, chains: list[list[bytes]], owner: str) -> list[int]:
        """``lookup`` of several prompts' chunk chains in one round trip: leading chunks
        of each held by every rank, all pinned for ``owner`` (replacing its pins)."""
        return self._chains_call(_OP_LOOKUP_PROMPTS, 3, chunk_size, chains, owner)

    def _chains_call(
        self, op: int, slot: int, chunk_size: int, chains: list[list[bytes]], owner: str
    ) -> list[int]:
        payload: list[bytes] = []

        def ask(rank: int, local: Any) -> list[int]:
            if local is not None:
                fn = local[slot] if len(local) > slot else _no_chains
                return list(fn(chunk_size, chains, owner))
            if not payload:
                payload.append(_encode_chains(chunk_size, chains, owner))
            raw = self._request(rank, op, payload[0], None)
            return [_U32.unpack_from(raw, 4 * i)[0] for i in range(len(raw) // 4)]

        best = [len(c) for c in chains]
        return self._min_over_ranks(ask, best) if any(best) else best

    def sources(self, owner: str) -> list[list[str]]:
        """Each rank's answer to where the chunks ``owner``'s last lookup found are (a rank
        that cannot say answers an empty list)."""
        out: list[list[str]] = []
        with self._lock:
            for rank in range(self.world_size):
                local = _LOCAL.get((self.engine_id, rank))
                try:
                    if local is not None:
                        out.append(list(local[4](owner)) if len(local) > 4 else [])
                        continue
                    raw = self._request(rank, _OP_SOURCES, owner.encode(), None)
                    codes = [_U32.unpack_from(raw, 4 * i)[0] for i in range(len(raw) // 4)]
                    out.append([_SOURCE_NAMES.get(c, "remote") for c in codes])
                except Exception:
                    out.append([])
        return out

    def unpin(self, owner: str) -> None:
        with self._lock:
            for rank in range(self.world_size):
                local = _LOCAL.get((self.engine_id, rank))
                try:
                    if local is not None:
                        local[1](owner)
                    else:
                        self._call(rank, _OP_UNPIN, owner.encode())
                except Exception:
                    self._warn(rank)

    def _warn(self, rank: int) -> None:
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            logger.warning(
                "lmcache: rank %d did not answer a lookup (socket %s); counting misses",
                rank,
                socket_path(self.engine_id, rank),
                exc_info=True,
            )

    def close(self) -> None:
        for s in self._socks.values():
            s.close()
        self._socks.clear()
