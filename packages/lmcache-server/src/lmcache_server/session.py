"""One client connection: its handshake, its requests, its leases.

A session serves one engine process's store for one key namespace (a vLLM
worker of one rank, an SGLang rank). It runs on a thread of its own and
handles its requests in order.

What the session owns is tied to the connection, so a client that dies
(``kill -9`` mid-load, mid-store) leaks nothing:

* **leases**: chunks handed to the client, numbered per session. A load's
  chunk stays valid (its slot is not reused) until released; a store's fresh
  slot is in no tier, so no lookup sees half-written bytes, until committed.
  When the connection closes, every lease is released: uncommitted slots go
  back to the pool.
* **pins**: the owners (request ids) the client pinned lookups for, scoped by
  session so that clients never touch each other's; unpinned on close.

Everything a client sends is checked before it is used: sizes by the wire
reader, the HELLO's namespace by rebuilding it (a bad layout or model is an
error reply), keys are formed here from the session's namespace (a client
can name chunks of its own namespace only), and leases are looked up in the
session's own table (a forged or foreign lease number is an error reply, and
never an offset the server computes from client input).
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmcache_core.auth import secrets_of
from lmcache_core.cache_key import CacheKey, KeyNamespace
from lmcache_core.errors import LayoutError
from lmcache_core.hit_sources import KINDS
from lmcache_core.keys import ChunkSpan
from lmcache_core.layout import KVLayout
from lmcache_core.mp import wire
from lmcache_core.mp.connection import hello_proof
from lmcache_core.mp.wire import Op, ProtocolError, Reader, Writer
from lmcache_core.pool import Chunk

from lmcache_server.namespaces import Namespace, RefusedClient

if TYPE_CHECKING:
    from lmcache_server.server import CacheServer

logger = logging.getLogger(__name__)

_HASHES = ("sha256", "blake3", "xxh3_128")
#: Owners (request ids) with pins one session may hold; past it the oldest are unpinned.
MAX_OWNERS = 1 << 16
#: Leases one session may hold (chunks being loaded or stored); past it, requests fail.
MAX_LEASES = 1 << 18
_CODE_OF_KIND = {k: i for i, k in enumerate(KINDS)}


class ClientError(Exception):
    """A well-formed request the server refuses (the reply says why)."""


class Session:
    """The server side of one client connection."""

    def __init__(self, server: CacheServer, sock: socket.socket, *, is_unix: bool, peer: str):
        self.server = server
        self.sock = sock
        self.is_unix = is_unix
        self.peer = peer
        self.id = server.next_session_id()
        self.ns: Namespace | None = None
        self._leases: dict[int, tuple[Chunk, ChunkSpan | None, str]] = {}
        self._next_lease = 1
        self._owners: dict[str, None] = {}
        self.closed = threading.Event()

    # ------------------------------------------------------------------ life

    def run(self) -> None:
        m = self.server.metrics
        try:
            self._handshake()
            while not self.server.stopping:
                op, seq, body = wire.read_frame(self.sock)
                one_way = bool(op & wire.ONE_WAY)
                op &= ~wire.ONE_WAY
                try:
                    reply = self._handle(op, body)
                except (ClientError, ProtocolError, LayoutError, ValueError) as e:
                    m.inc("lmcache:server_bad_requests")
                    logger.warning("lmcache server: session %d: %s", self.id, e)
                    if not one_way:
                        self._send(Op.ERROR, seq, str(e).encode())
                    continue
                if not one_way:
                    self._send(Op.REPLY, seq, reply)
        except (ConnectionError, TimeoutError, OSError):
            pass  # the client went away: normal
        except ProtocolError as e:
            m.inc("lmcache:server_bad_requests")
            logger.warning("lmcache server: session %d from %s dropped: %s", self.id, self.peer, e)
        except Exception:
            logger.exception("lmcache server: session %d failed", self.id)
        finally:
            self.close()

    def close(self) -> None:
        """Release every lease and pin of this session (idempotent)."""
        if self.closed.is_set():
            return
        self.closed.set()
        ns = self.ns
        if ns is not None:
            with ns.lock:
                for owner in list(self._owners):
                    ns.store.unpin(owner)
            leases, self._leases = self._leases, {}
            for chunk, _, _ in leases.values():
                chunk.release()
            if leases:
                logger.info(
                    "lmcache server: session %d closed with %d chunks leased; released",
                    self.id,
                    len(leases),
                )
            self.server.registry.leave(ns)
        try:
            self.sock.close()
        except OSError:
            pass
        self.server.session_closed(self)

    def _send(self, op: int, seq: int, body: bytes, fds: list[int] | None = None) -> None:
        data = wire.frame(op, seq, body)
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    # ------------------------------------------------------------------ handshake

    def _handshake(self) -> None:
        needs_auth = not self.is_unix
        challenge = secrets.token_bytes(32)
        about = json.dumps(self.server.about()).encode()
        greet = (
            Writer().u32(wire.PROTOCOL_VERSION).blob(challenge).u8(needs_auth).blob(about).body()
        )
        self._send(Op.HELLO, 0, greet)
        self.sock.settimeout(self.server.handshake_timeout)
        op, seq, body = wire.read_frame(self.sock)
        if op != Op.HELLO:
            raise ProtocolError(f"the first frame was op {op}, not HELLO")
        try:
            r = Reader(body)
            version = r.u32()
            proof = r.blob(64)
            hello_raw = r.blob(1 << 16)
            r.end()
            if version != wire.PROTOCOL_VERSION:
                raise ClientError(
                    f"this server speaks protocol {wire.PROTOCOL_VERSION}, the client {version}: "
                    "upgrade lmcache on the older side"
                )
            if needs_auth:
                secret = self.server.registry.secret
                # Any of the deployment's secrets (a rotation: clients may seal with the new one).
                if secret is None or not any(
                    hmac.compare_digest(proof, hello_proof(s, challenge))
                    for s in secrets_of(secret)
                ):
                    self.server.metrics.inc("lmcache:server_auth_failures")
                    raise ClientError("authentication failed: the deployment secrets differ")
            spec = parse_hello(hello_raw)
            self.ns = self.server.registry.open(spec)
        except (ClientError, RefusedClient, LayoutError, ProtocolError, ValueError) as e:
            self.server.metrics.inc("lmcache:server_bad_requests")
            logger.warning("lmcache server: refused a client from %s: %s", self.peer, e)
            self._send(Op.ERROR, seq, str(e).encode())
            raise ConnectionError("refused") from None
        reg = self.server.registry
        assert reg.pool is not None
        info = {
            "server_version": self.server.version,
            "tiers": self.ns.store.tier_names,
            "num_slots": reg.pool.num_slots,
            "slot_bytes": reg.pool.slot_bytes,
            "shm_name": reg.arena.shm_name if not self.is_unix else None,
        }
        reply = (
            Writer()
            .u64(self.id)
            .u64(reg.arena.size)
            .digest(spec.digest)
            .blob(json.dumps(info).encode())
            .body()
        )
        self._send(Op.REPLY, seq, reply, fds=[reg.arena.fd] if self.is_unix else None)
        self.sock.settimeout(None)
        logger.info(
            "lmcache server: session %d from %s: %s rank %d/%d",
            self.id,
            self.peer,
            spec.model,
            spec.rank,
            spec.world_size,
        )

    # ------------------------------------------------------------------ requests

    def _handle(self, op: int, body: bytes) -> bytes:
        handler = self._HANDLERS.get(op)
        if handler is None:
            raise ClientError(f"unknown op {op}")
        r = Reader(body)
        ns = self.ns
        assert ns is not None
        with ns.lock:
            out = handler(self, r, ns)
        return out

    def _key(self, prefix: bytes) -> CacheKey:
        assert self.ns is not None
        return CacheKey(self.ns.spec.digest + prefix)

    def _keys(self, r: Reader) -> list[CacheKey]:
        return [self._key(d) for d in r.digests()]

    def _owner(self, name: str) -> str:
        return f"{self.id}/{name}"

    def _spans(self, r: Reader) -> tuple[list[CacheKey], list[ChunkSpan]]:
        n = r.count()
        keys, spans = [], []
        limit = 1 << 30
        for _ in range(n):
            prefix = r.digest()
            start, end = r.u32(), r.u32()
            if not start < end <= limit:
                raise ClientError(f"a chunk span [{start}, {end}) is empty or too long")
            keys.append(self._key(prefix))
            spans.append(ChunkSpan(start, end, prefix))
        return keys, spans

    def _lease(self, chunk: Chunk, span: ChunkSpan | None, tenant: str = "") -> int:
        if len(self._leases) >= MAX_LEASES:
            chunk.release()
            raise ClientError(f"more than {MAX_LEASES} chunks leased: release some first")
        lease = self._next_lease
        self._next_lease += 1
        self._leases[lease] = (chunk, span, tenant)
        return lease

    def _describe(self, w: Writer, leased: list[tuple[int, Chunk, ChunkSpan]]) -> bytes:
        base = self.server.registry.arena.address
        pack = wire.CHUNK_RECORD.pack
        w.u32(len(leased))
        w.raw(
            b"".join(
                pack(lease, c.address - base, c.nbytes, sp.end - sp.start, sp.start, sp.end)
                for lease, c, sp in leased
            )
        )
        return w.body()

    def op_lookup(self, r: Reader, ns: Namespace) -> bytes:
        owner = r.string()
        alias_last = bool(r.u8())
        keys = self._keys(r)
        r.end()
        scoped = self._track(owner)
        hits = ns.store.lookup(keys, owner=scoped, alias_last=alias_last)
        return Writer().u32(hits).body()

    def op_lookup_chains(self, r: Reader, ns: Namespace) -> bytes:
        owner = r.string()
        aliases = bool(r.u8())
        chains = [self._keys(r) for _ in range(r.count(4096))]
        r.end()
        hits = ns.store.lookup_chains(chains, owner=self._track(owner), aliases=aliases)
        return Writer().u32s(hits).body()

    def _track(self, owner: str) -> str | None:
        if not owner:
            return None
        scoped = self._owner(owner)
        self._owners[scoped] = None
        if len(self._owners) > MAX_OWNERS:  # the oldest owners forgot to unpin
            oldest = next(iter(self._owners))
            del self._owners[oldest]
            assert self.ns is not None
            self.ns.store.unpin(oldest)
        return scoped

    def op_prefix_present(self, r: Reader, ns: Namespace) -> bytes:
        keys = self._keys(r)
        r.end()
        return Writer().u32(ns.store.prefix_present(keys)).body()

    def op_hit_kinds(self, r: Reader, ns: Namespace) -> bytes:
        owner = self._owner(r.string())
        r.end()
        kinds = ns.store.hit_kinds(owner)
        return Writer().u32s([_CODE_OF_KIND.get(k, len(KINDS) - 1) for k in kinds]).body()

    def op_unpin(self, r: Reader, ns: Namespace) -> bytes:
        owner = self._owner(r.string())
        r.end()
        self._owners.pop(owner, None)
        ns.store.unpin(owner)
        return b""

    def op_add_aliases(self, r: Reader, ns: Namespace) -> bytes:
        target = self._key(r.digest())
        target_tokens = r.u32()
        pairs = [(self._key(r.digest()), r.u32()) for _ in range(r.count(4096))]
        r.end()
        ns.store.add_aliases(target, target_tokens, pairs)  # ValueError on nonsense: refused
        return b""

    def op_fetch(self, r: Reader, ns: Namespace) -> bytes:
        alias_last = bool(r.u8())
        keys, spans = self._spans(r)
        r.end()
        chunks, got = ns.store.fetch(keys, spans, alias_last=alias_last)
        quotas = self.server.registry.quotas
        if quotas.enabled:
            quotas.touched([c.key for c in chunks])
        leased = []
        for i, (chunk, span) in enumerate(zip(chunks, got)):
            try:
                leased.append((self._lease(chunk, None), chunk, span))  # type: ignore[arg-type]
            except ClientError:
                for c in chunks[i + 1 :]:
                    c.release()
                raise
        self.server.metrics.inc("lmcache:server_leased_chunks", len(leased))
        return self._describe(Writer(), leased)  # type: ignore[arg-type]

    def op_allocate(self, r: Reader, ns: Namespace) -> bytes:
        tenant = r.string()
        keys, spans = self._spans(r)
        r.end()
        quotas = self.server.registry.quotas
        if quotas.enabled:
            need = sum(ns.spec.layout.chunk_bytes(s.num_tokens) for s in spans)
            if not quotas.make_room(tenant, need):
                self.server.metrics.inc("lmcache:server_quota_skips")
                return Writer().u32(0).body()
        staged = ns.store.allocate(keys, spans)
        leased = []
        for i, (span, chunk) in enumerate(staged):
            try:
                leased.append((self._lease(chunk, span, tenant), chunk, span))  # type: ignore[arg-type]
            except ClientError:
                for _, c in staged[i + 1 :]:
                    c.release()
                raise
        return self._describe(Writer(), leased)  # type: ignore[arg-type]

    def op_commit(self, r: Reader, ns: Namespace) -> bytes:
        leases = r.u64s()
        r.end()
        staged = []
        tenant = ""
        for lease in leases:  # all checked before any is taken
            entry = self._leases.get(lease)
            if entry is None or entry[1] is None:
                raise ClientError(f"lease {lease} is not a fresh slot of this session")
        if len(set(leases)) != len(leases):
            raise ClientError("a lease is committed twice in one request")
        for lease in leases:
            chunk, span, tenant = self._leases.pop(lease)
            assert span is not None
            staged.append((span, chunk))
        stored = ns.store.commit(staged)
        quotas = self.server.registry.quotas
        if quotas.enabled and staged:
            keys = [c.key for _, c in staged]
            cpu = self.server.registry.cpu
            held = cpu.contains(keys) if cpu is not None else []
            quotas.stored(tenant, [(k, c.nbytes) for k, (_, c), h in zip(keys, staged, held) if h])
        return Writer().u32(stored).body()

    def op_release(self, r: Reader, ns: Namespace) -> bytes:
        leases = r.u64s()
        r.end()
        unknown = 0
        for lease in leases:
            entry = self._leases.pop(lease, None)
            if entry is None:
                unknown += 1
                continue
            entry[0].release()
        if unknown:
            raise ClientError(f"{unknown} of {len(leases)} released leases were not this session's")
        return b""

    def op_remove(self, r: Reader, ns: Namespace) -> bytes:
        keys = self._keys(r)
        r.end()
        return Writer().u32(ns.store.remove(keys)).body()

    def op_flush(self, r: Reader, ns: Namespace) -> bytes:
        timeout = r.f64()
        r.end()
        if timeout != timeout or timeout > 3600:  # NaN or unreasonable
            raise ClientError("flush timeout must be at most 3600 s")
        return Writer().u8(ns.store.flush(None if timeout < 0 else timeout)).body()

    def op_status(self, r: Reader, ns: Namespace) -> bytes:
        r.end()
        return Writer().blob(json.dumps(self.server.status()).encode()).body()

    def op_ping(self, r: Reader, ns: Namespace) -> bytes:
        r.end()
        return b""

    _HANDLERS: dict[int, Callable[[Session, Reader, Namespace], bytes]] = {
        Op.LOOKUP: op_lookup,
        Op.LOOKUP_CHAINS: op_lookup_chains,
        Op.PREFIX_PRESENT: op_prefix_present,
        Op.HIT_KINDS: op_hit_kinds,
        Op.UNPIN: op_unpin,
        Op.ADD_ALIASES: op_add_aliases,
        Op.FETCH: op_fetch,
        Op.ALLOCATE: op_allocate,
        Op.COMMIT: op_commit,
        Op.RELEASE: op_release,
        Op.REMOVE: op_remove,
        Op.FLUSH: op_flush,
        Op.STATUS: op_status,
        Op.PING: op_ping,
    }


def parse_hello(raw: bytes) -> KeyNamespace:
    """The key namespace a client's HELLO describes, every field checked."""
    try:
        hello = json.loads(raw)
    except (ValueError, RecursionError):
        raise ClientError("the HELLO is not JSON") from None
    if not isinstance(hello, dict) or not isinstance(hello.get("namespace"), dict):
        raise ClientError("the HELLO has no namespace object")
    n: dict[str, Any] = hello["namespace"]
    lay = n.get("layout")
    if not isinstance(lay, dict):
        raise ClientError("the HELLO's namespace has no layout object")
    model = n.get("model")
    if not isinstance(model, str) or not 0 < len(model) <= 1024:
        raise ClientError("the namespace's model must be a non-empty string of at most 1024")
    ints = {}
    for name, hi in (("chunk_size", 1 << 20), ("world_size", 1 << 16), ("rank", 1 << 16)):
        v = n.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
            raise ClientError(f"the namespace's {name}={v!r} must be an integer in [0, {hi}]")
        ints[name] = v
    if ints["chunk_size"] < 1 or ints["world_size"] < 1:
        raise ClientError("chunk_size and world_size must be positive")
    algo = n.get("hash_algorithm")
    if algo not in _HASHES:
        raise ClientError(f"hash_algorithm={algo!r} is not one of {', '.join(_HASHES)}")
    extra = n.get("extra", [])
    if (
        not isinstance(extra, list)
        or len(extra) > 64
        or not all(
            isinstance(kv, list)
            and len(kv) == 2
            and all(isinstance(x, str) and len(x) <= 4096 for x in kv)
            for kv in extra
        )
    ):
        raise ClientError("the namespace's extra must be at most 64 [name, value] string pairs")
    layout_fields = {}
    for name in ("num_layers", "num_kv_heads", "head_size", "block_size"):
        v = lay.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1 << 20:
            raise ClientError(f"the layout's {name}={v!r} must be a positive integer")
        layout_fields[name] = v
    if not isinstance(lay.get("kind"), str) or not isinstance(lay.get("dtype"), str):
        raise ClientError("the layout's kind and dtype must be strings")
    layout = KVLayout(kind=lay["kind"], dtype=lay["dtype"], **layout_fields)
    layout.check_chunk_size(ints["chunk_size"])
    try:
        return KeyNamespace(
            model=model,
            layout=layout,
            chunk_size=ints["chunk_size"],
            world_size=ints["world_size"],
            rank=ints["rank"],
            hash_algorithm=algo,
            extra=tuple(sorted((k, v) for k, v in extra)),
        )
    except ImportError as e:  # blake3 not installed on the server
        raise ClientError(f"this server cannot hash keys with {algo}: {e}") from None
