"""A connection to an ``lmcache server``: the socket, the handshake, the mapped arena.

:class:`ServerSession` is one connection (what a HELLO agreed on: the session,
the key namespace's digest as the server derived it, the arena mapped into this
process); :func:`server_about` asks a server its settings before any HELLO.
:class:`~lmcache_core.mp.client.ServerChunkStore` keeps one session at a time
and replaces it when it breaks.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import threading
from typing import Any

from lmcache_core.cache_key import KeyNamespace
from lmcache_core.mp import wire
from lmcache_core.mp.address import ServerAddress, check_socket_dir
from lmcache_core.mp.shared_memory import ArenaMapping
from lmcache_core.mp.wire import Op, ProtocolError, Reader, ServerError, Writer


def hello_payload(namespace: KeyNamespace, **client: Any) -> dict[str, Any]:
    """What a client tells the server about itself: its key namespace, in full, so the
    server derives the namespace digest (and the KV layout its tiers check) itself."""
    lay = namespace.layout
    return {
        "namespace": {
            "model": namespace.model,
            "layout": {
                "kind": lay.kind.value,
                "dtype": lay.dtype,
                "num_layers": lay.num_layers,
                "num_kv_heads": lay.num_kv_heads,
                "head_size": lay.head_size,
                "block_size": lay.block_size,
            },
            "chunk_size": namespace.chunk_size,
            "world_size": namespace.world_size,
            "rank": namespace.rank,
            "hash_algorithm": namespace.hash_algorithm,
            "extra": [list(kv) for kv in namespace.extra],
        },
        "client": client,
    }


def hello_proof(secret: bytes, challenge: bytes) -> bytes:
    """The answer to a server's challenge: proves the deployment secret, reveals nothing."""
    return hmac.new(secret, b"lmcache-mp-hello\0" + challenge, "sha256").digest()


class ServerSession:
    """One connection to a server: the socket, the mapped arena, and what HELLO said."""

    def __init__(
        self,
        address: ServerAddress,
        hello: dict[str, Any],
        *,
        secret: bytes | None,
        timeout: float,
        generation: int,
    ) -> None:
        self.address = address
        self.generation = generation
        self._lock = threading.Lock()
        self._seq = 0
        self.sock = _connect(address, timeout)
        try:
            self._handshake(hello, secret)
        except BaseException:
            self.sock.close()
            raise

    def _handshake(self, hello: dict[str, Any], secret: bytes | None) -> None:
        op, _, body = wire.read_frame(self.sock)
        if op != Op.HELLO:
            raise ProtocolError(f"the server greeted with op {op}, not HELLO")
        r = Reader(body)
        version = r.u32()
        challenge = r.blob(64)
        needs_auth = bool(r.u8())
        self.about = _json_object(r.blob(1 << 16))
        r.end()
        if version != wire.PROTOCOL_VERSION:
            raise ServerError(
                f"the server speaks protocol {version}, this client {wire.PROTOCOL_VERSION}: "
                "upgrade lmcache on the older side"
            )
        proof = b""
        if needs_auth:
            if secret is None:
                raise ServerError(
                    f"the server at {self.address} requires the deployment secret: set "
                    "LMCACHE_AUTH_SECRET (or auth_secret_file) as the server has it"
                )
            proof = hello_proof(secret, challenge)
        body = (
            Writer().u32(wire.PROTOCOL_VERSION).blob(proof).blob(json.dumps(hello).encode()).body()
        )
        self.sock.sendall(wire.frame(Op.HELLO, 0, body))
        msg, fds, _, _ = (
            socket.recv_fds(self.sock, 4 + 1 + 4, 1)
            if self.address.is_unix
            else (
                wire.recv_exact(self.sock, 9),
                [],
                0,
                None,
            )
        )
        if len(msg) < 9:
            msg += wire.recv_exact(self.sock, 9 - len(msg))
        try:
            length = int.from_bytes(msg[:4], "little")
            op = msg[4]
            if length < 5 or length > wire.MAX_FRAME:
                raise ProtocolError(f"a HELLO reply of {length} bytes")
            body = wire.recv_exact(self.sock, length - 5)
            if op == Op.ERROR:
                raise ServerError(body.decode("utf-8", "replace"))
            if op != Op.REPLY:
                raise ProtocolError(f"the server answered HELLO with op {op}")
            r = Reader(body)
            self.session_id = r.u64()
            arena_size = r.u64()
            self.namespace = r.digest()
            self.info: dict[str, Any] = _json_object(r.blob(1 << 20))
            r.end()
            info = self.info
            if fds:
                self.mapping: ArenaMapping | None = ArenaMapping(fds[0], arena_size)
            elif info.get("shm_name"):
                self.mapping = ArenaMapping.open_named(str(info["shm_name"]), arena_size)
            else:
                raise ServerError(
                    "the server sent no shared arena: an lmcache server serves engines on its "
                    "own host only (connect through its Unix socket)"
                )
        finally:
            for fd in fds:
                os.close(fd)

    def call(self, op: Op, body: bytes, *, prelude: bytes = b"") -> Reader:
        """Send a request (after ``prelude``: one-way frames batched with it); its reply."""
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFF_FFFF
            seq = self._seq
            self.sock.sendall(prelude + wire.frame(op, seq, body))
            rop, rseq, rbody = wire.read_frame(self.sock)
        if rseq != seq:
            raise ProtocolError(f"a reply to request {rseq} came for request {seq}")
        if rop == Op.ERROR:
            raise ServerError(rbody.decode("utf-8", "replace"))
        if rop != Op.REPLY:
            raise ProtocolError(f"the server replied with op {rop}")
        return Reader(rbody)

    def send(self, frames: bytes) -> None:
        """One-way frames (no reply)."""
        with self._lock:
            self.sock.sendall(frames)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        out = json.loads(raw)
    except (ValueError, RecursionError):
        raise ProtocolError("the server sent a field that is not JSON") from None
    if not isinstance(out, dict):
        raise ProtocolError("the server sent JSON that is not an object")
    return out


def server_about(address: ServerAddress, timeout: float = 5.0) -> dict[str, Any]:
    """What a server says of itself before any HELLO (its chunk size, version): for a
    client that must match the server's settings before it can name its namespace."""
    sock = _connect(address, timeout)
    try:
        op, _, body = wire.read_frame(sock)
        if op != Op.HELLO:
            raise ProtocolError(f"the server greeted with op {op}, not HELLO")
        r = Reader(body)
        r.u32()
        r.blob(64)
        r.u8()
        about = _json_object(r.blob(1 << 16))
        r.end()
        return about
    finally:
        sock.close()


def _connect(address: ServerAddress, timeout: float) -> socket.socket:
    if address.is_unix:
        assert address.path is not None
        check_socket_dir(os.path.dirname(address.path) or "/")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.path
    else:
        sock = socket.socket(socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = (address.host, address.port)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    return sock
