"""The client of an ``lmcache server``: a :class:`~lmcache_core.chunk_store.ChunkStore`
whose chunks are slots of the server's shared arena.

A :class:`~lmcache_core.engine.CacheEngine` built on a :class:`ServerChunkStore`
keys prompts and copies KV exactly as in-process; only where chunks live
differs. Each store call is one round trip on the control socket (one per
request step, never per chunk); the copies go straight into or out of the
arena, which this process maps.

Availability first: the server may be absent at start, be killed, or be
restarted. Then every call is a miss (counted as a failure of tier
``server``), no request fails and nothing blocks longer than
``server_timeout``; the client reconnects (at most every few seconds) and
carries on with the new server's arena. Chunks handed out before keep the
old mapping alive until they are released.

Leases: a chunk the server hands out (a load's, or a store's fresh slot) is
leased to this connection until released (or committed); the server frees
every lease of a connection that closes, so a client killed mid-copy leaks
nothing. Releases are batched and ride along with the next call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from lmcache_core.cache_key import CacheKey, KeyNamespace
from lmcache_core.chunk_store import ChunkStore, Staged, StoredChunk
from lmcache_core.hit_sources import KINDS
from lmcache_core.keys import ChunkSpan
from lmcache_core.metrics import Metrics
from lmcache_core.mp import wire
from lmcache_core.mp.address import ServerAddress
from lmcache_core.mp.connection import ServerSession, hello_payload, server_about
from lmcache_core.mp.shared_memory import ArenaMapping
from lmcache_core.mp.wire import Op, ProtocolError, Reader, ServerError, Writer

logger = logging.getLogger(__name__)

#: Seconds between attempts to reach a server that is not there.
RECONNECT_BACKOFF_S = (0.5, 10.0)
#: Releases kept back to ride along with the next call, at most.
MAX_PENDING_RELEASES = 256
#: Seconds a release waits for others to share its frame (or for the next call).
RELEASE_DELAY_S = 0.002

#: Which tier name a hit-kind code on the wire stands for.
_KIND_OF_CODE = dict(enumerate(KINDS))


class RemoteChunk:
    """A chunk in a slot of the server's arena, leased to this client until released."""

    __slots__ = ("_released", "_session", "_store", "key", "lease", "nbytes", "num_tokens", "view")

    def __init__(
        self,
        store: ServerChunkStore,
        session: ServerSession,
        lease: int,
        key: CacheKey,
        num_tokens: int,
        view: memoryview,
    ) -> None:
        self._store = store
        self._session = session
        self.lease = lease
        self.key = key
        self.num_tokens = num_tokens
        self.nbytes = len(view)
        self.view = view
        self._released = False

    def release(self) -> None:
        if self._released:
            raise RuntimeError("release() of a chunk that was already released")
        self._released = True
        self._store._release([self])

    @staticmethod
    def release_many(chunks: Sequence[RemoteChunk]) -> None:
        """Release several chunks in one message (a load's, as it finishes)."""
        by_store: dict[int, tuple[ServerChunkStore, list[RemoteChunk]]] = {}
        for c in chunks:
            if c._released:
                raise RuntimeError("release() of a chunk that was already released")
            c._released = True
            by_store.setdefault(id(c._store), (c._store, []))[1].append(c)
        for store, batch in by_store.values():
            store._release(batch)


class ServerChunkStore(ChunkStore):
    """The chunks of one key namespace, held by an ``lmcache server`` on this host."""

    def __init__(
        self,
        address: ServerAddress,
        namespace: KeyNamespace,
        *,
        metrics: Metrics | None = None,
        secret: bytes | None = None,
        timeout: float = 5.0,
        client_info: dict[str, Any] | None = None,
        on_map: Callable[[ArenaMapping], Any] | None = None,
        connect_now: bool = True,
    ) -> None:
        """``on_map(mapping)`` is called with each new mapping of a server's arena (a GPU
        client pins it for DMA); what it returns is kept while the mapping is in use and
        closed (if it has ``close``) when the connection is replaced."""
        self.address = address
        self.namespace = namespace
        self.metrics = metrics if metrics is not None else Metrics()
        self._secret = secret
        self._timeout = timeout
        self._hello = hello_payload(namespace, pid=os.getpid(), **(client_info or {}))
        self._on_map = on_map
        self._session: ServerSession | None = None
        self._map_handle: Any = None
        self._generation = 0
        self._next_try = 0.0
        self._backoff = RECONNECT_BACKOFF_S[0]
        self._state_lock = threading.Lock()
        self._pending: list[int] = []
        self._watchers: list[Callable[[str, str, list[CacheKey]], None]] = []
        self._warned_down = False
        self._closed = False
        #: Wakes the thread that sends releases kept back (a load's chunks, as it finishes).
        self._release_due = threading.Event()
        self._flusher: threading.Thread | None = None
        if connect_now:
            self._connected()

    # ------------------------------------------------------------------ connection

    @property
    def connected(self) -> bool:
        return self._session is not None

    @property
    def tier_names(self) -> list[str]:  # type: ignore[override]
        s = self._session
        tiers = s.info.get("tiers", []) if s is not None else []
        return [f"server:{t}" for t in tiers] or ["server"]

    @property
    def num_slots(self) -> int:
        s = self._session
        return int(s.info.get("num_slots", 0)) if s is not None else 0

    def _connected(self) -> ServerSession | None:
        """The live session, or a new one if it is time to try again; None while down."""
        s = self._session
        if s is not None or self._closed:
            return s
        now = time.monotonic()
        if now < self._next_try:
            return None
        with self._state_lock:
            if self._session is not None:
                return self._session
            self._generation += 1
            try:
                s = ServerSession(
                    self.address,
                    self._hello,
                    secret=self._secret,
                    timeout=self._timeout,
                    generation=self._generation,
                )
            except ServerError as e:  # refused: say why, loudly, and back off long
                logger.error("lmcache server at %s refused this engine: %s", self.address, e)
                self._down(now, RECONNECT_BACKOFF_S[1])
                return None
            except (OSError, ProtocolError, ValueError) as e:
                if not self._warned_down:
                    logger.warning(
                        "lmcache server at %s is not reachable (%s); serving without the "
                        "cache until it is",
                        self.address,
                        e,
                    )
                    self._warned_down = True
                self._down(now, self._backoff)
                self._backoff = min(self._backoff * 2, RECONNECT_BACKOFF_S[1])
                return None
            if s.namespace != self.namespace.digest:
                logger.error(
                    "lmcache server at %s derived another key namespace for this engine "
                    "(its lmcache is another version?); not using it",
                    self.address,
                )
                s.close()
                self._down(now, RECONNECT_BACKOFF_S[1])
                return None
            if self._on_map is not None and s.mapping is not None:
                try:
                    self._map_handle = self._on_map(s.mapping)
                except Exception:
                    logger.exception("preparing the server's arena for this engine failed")
            self._session = s
            self._pending = []
            self._backoff = RECONNECT_BACKOFF_S[0]
            self._warned_down = False
            logger.info(
                "lmcache: connected to the server at %s (session %d, %d slots, tiers: %s)",
                self.address,
                s.session_id,
                self.num_slots,
                ", ".join(self.tier_names),
            )
            return s

    def _down(self, now: float, wait: float) -> None:
        self._next_try = now + wait

    def _lost(self, session: ServerSession, op: str, error: BaseException) -> None:
        """The connection broke: drop it (its leases die with it on the server)."""
        self.metrics.inc("lmcache:num_failures", tier="server", op=op)
        with self._state_lock:
            if self._session is not session:
                return
            self._session = None
            self._pending = []
            self._down(time.monotonic(), RECONNECT_BACKOFF_S[0])
        logger.warning("lmcache server connection lost in %s (%s); reconnecting", op, error)
        session.close()

    def _call(self, op: Op, body: bytes, default: Any, parse: Callable[[Reader], Any]) -> Any:
        s = self._connected()
        if s is None:
            self.metrics.inc("lmcache:num_failures", tier="server", op=op.name.lower())
            return default
        prelude = self._take_releases(s)
        try:
            r = s.call(op, body, prelude=prelude)
            out = parse(r)
            r.end()
            return out
        except ServerError as e:
            logger.warning("lmcache server refused %s: %s", op.name, e)
            self.metrics.inc("lmcache:num_failures", tier="server", op=op.name.lower())
            return default
        except (OSError, ProtocolError, ValueError) as e:
            self._lost(s, op.name.lower(), e)
            return default

    def _send(self, op: Op, body: bytes) -> None:
        s = self._connected()
        if s is None:
            return
        try:
            s.send(self._take_releases(s) + wire.frame(op | wire.ONE_WAY, 0, body))
        except OSError as e:
            self._lost(s, op.name.lower(), e)

    def _take_releases(self, s: ServerSession) -> bytes:
        with self._state_lock:
            pending, self._pending = self._pending, []
        if not pending:
            return b""
        return wire.frame(Op.RELEASE | wire.ONE_WAY, 0, Writer().u64s(pending).body())

    def _release(self, chunks: Sequence[RemoteChunk]) -> None:
        s = self._session
        leases = [c.lease for c in chunks if s is not None and c._session is s]
        if not leases:
            return  # the server that leased them is gone, and their leases with it
        with self._state_lock:
            self._pending.extend(leases)
            flush = len(self._pending) >= MAX_PENDING_RELEASES
            if self._flusher is None and not flush:
                self._flusher = threading.Thread(
                    target=self._flush_soon, daemon=True, name="lmcache-release"
                )
                self._flusher.start()
        if flush:
            self._flush_releases()
        else:
            self._release_due.set()

    def _flush_soon(self) -> None:
        """Send releases a moment after they are made: a load releases its chunks one by
        one, and one frame for all of them is enough; the slots must not stay leased
        while the engine is idle (they could not be evicted)."""
        while not self._closed:
            self._release_due.wait()
            self._release_due.clear()
            time.sleep(RELEASE_DELAY_S)
            self._flush_releases()

    def _flush_releases(self) -> None:
        s = self._session
        if s is None:
            return
        frames = self._take_releases(s)
        if frames:
            try:
                s.send(frames)
            except OSError as e:
                self._lost(s, "release", e)

    def flush_releases(self) -> None:
        """Send the releases kept back now (an engine going idle)."""
        self._flush_releases()

    # ------------------------------------------------------------------ helpers

    def _live(self) -> ServerSession:
        s = self._session
        if s is None:
            raise ConnectionError("the server connection closed during the call")
        return s

    def _prefixes(self, keys: Sequence[CacheKey]) -> list[bytes]:
        ns = self.namespace.digest
        out = []
        for k in keys:
            if k[: len(ns)] != ns:
                raise ValueError("a key of another namespace was given to this engine's store")
            out.append(bytes(k[len(ns) :]))
        return out

    def _key(self, prefix: bytes) -> CacheKey:
        return CacheKey(self.namespace.digest + prefix)

    def _spans_body(self, w: Writer, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan]) -> None:
        prefixes = self._prefixes(keys)
        w.u32(len(prefixes))
        for p, s in zip(prefixes, spans, strict=True):
            w.digest(p).u32(s.start).u32(s.end)

    def _chunks(
        self,
        s: ServerSession,
        r: Reader,
        keys: Sequence[CacheKey],
        spans: Sequence[ChunkSpan],
    ) -> tuple[list[StoredChunk], list[ChunkSpan]]:
        """The chunks a FETCH or ALLOCATE reply leases, each matched to its requested key
        by where its span starts (an ALLOCATE skips the keys the server holds)."""
        records = r.records(wire.CHUNK_RECORD)
        if len(records) > len(keys):
            raise ProtocolError(f"{len(records)} chunks for {len(keys)} keys")
        key_at = {sp.start: k for sp, k in zip(spans, keys)}
        chunks: list[StoredChunk] = []
        got: list[ChunkSpan] = []
        mapping = s.mapping
        assert mapping is not None
        try:
            for lease, offset, nbytes, num_tokens, start, end in records:
                key = key_at.get(start)
                if key is None or end - start != num_tokens or end <= start:
                    raise ProtocolError(f"a chunk for span [{start}, {end}) was not asked for")
                view = mapping.slice(offset, nbytes)
                chunks.append(RemoteChunk(self, s, lease, key, num_tokens, view))
                got.append(ChunkSpan(start, end, key.prefix))
        except BaseException:
            self._release([c for c in chunks if isinstance(c, RemoteChunk)])
            raise
        return chunks, got

    # ------------------------------------------------------------------ lookups

    def lookup(self, keys: Sequence[CacheKey], *, owner: str | None, alias_last: bool) -> int:
        body = Writer().string(owner or "").u8(alias_last).digests(self._prefixes(keys)).body()
        return int(self._call(Op.LOOKUP, body, 0, lambda r: min(r.u32(), len(keys))))

    def lookup_chains(
        self, chains: Sequence[Sequence[CacheKey]], *, owner: str | None, aliases: bool
    ) -> list[int]:
        w = Writer().string(owner or "").u8(aliases).u32(len(chains))
        for chain in chains:
            w.digests(self._prefixes(chain))

        def parse(r: Reader) -> list[int]:
            hits = r.u32s()
            if len(hits) != len(chains):
                raise ProtocolError(f"{len(hits)} answers for {len(chains)} chains")
            return [min(h, len(c)) for h, c in zip(hits, chains)]

        return list(self._call(Op.LOOKUP_CHAINS, w.body(), [0] * len(chains), parse))

    def prefix_present(self, keys: Sequence[CacheKey]) -> int:
        body = Writer().digests(self._prefixes(keys)).body()
        return int(self._call(Op.PREFIX_PRESENT, body, 0, lambda r: min(r.u32(), len(keys))))

    def hit_kinds(self, owner: str) -> list[str]:
        def parse(r: Reader) -> list[str]:
            return [_KIND_OF_CODE.get(code, "remote") for code in r.u32s()]

        return list(self._call(Op.HIT_KINDS, Writer().string(owner).body(), [], parse))

    def unpin(self, owner: str) -> None:
        self._send(Op.UNPIN, Writer().string(owner).body())

    def add_aliases(
        self, target: CacheKey, target_tokens: int, pairs: Sequence[tuple[CacheKey, int]]
    ) -> None:
        w = Writer().digest(self._prefixes([target])[0]).u32(target_tokens).u32(len(pairs))
        for key, tokens in pairs:
            w.digest(self._prefixes([key])[0]).u32(tokens)
        self._send(Op.ADD_ALIASES, w.body())

    # ------------------------------------------------------------------ loads and stores

    def fetch(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], *, alias_last: bool
    ) -> tuple[list[StoredChunk], list[ChunkSpan]]:
        w = Writer().u8(alias_last)
        self._spans_body(w, keys, spans)
        got = self._call(
            Op.FETCH, w.body(), None, lambda r: self._chunks(self._live(), r, keys, spans)
        )
        return got if got is not None else ([], [])

    def allocate(
        self, keys: Sequence[CacheKey], spans: Sequence[ChunkSpan], *, tenant: str = ""
    ) -> list[Staged]:
        w = Writer().string(tenant)
        self._spans_body(w, keys, spans)
        got = self._call(
            Op.ALLOCATE, w.body(), None, lambda r: self._chunks(self._live(), r, keys, spans)
        )
        if not got:
            return []
        by_start = {sp.start: sp for sp in spans}
        return [(by_start[sp.start], c) for c, sp in zip(*got)]

    def commit(self, staged: Sequence[Staged]) -> int:
        mine = [c for _, c in staged if isinstance(c, RemoteChunk)]
        s = self._session
        live = [c for c in mine if c._session is s and not c._released]
        for c in mine:
            c._released = True
        if not live:
            return 0
        stored = self._call(
            Op.COMMIT, Writer().u64s([c.lease for c in live]).body(), 0, lambda r: r.u32()
        )
        if stored and self._watchers:
            self._notify("stored", "cpu", [c.key for c in live])
        return int(stored)

    def abort(self, staged: Sequence[Staged]) -> None:
        chunks = [c for _, c in staged if isinstance(c, RemoteChunk) and not c._released]
        for c in chunks:
            c._released = True
        self._release(chunks)

    # ------------------------------------------------------------------ admin

    def remove(self, keys: Sequence[CacheKey]) -> int:
        body = Writer().digests(self._prefixes(keys)).body()
        return int(self._call(Op.REMOVE, body, 0, lambda r: r.u32()))

    def watch(self, callback: Callable[[str, str, list[CacheKey]], None]) -> None:
        self._watchers.append(callback)

    def _notify(self, event: str, tier: str, keys: list[CacheKey]) -> None:
        for cb in self._watchers:
            try:
                cb(event, tier, keys)
            except Exception:
                logger.warning("a cache watcher failed on %s %s", event, tier, exc_info=True)

    def flush(self, timeout: float | None = None) -> bool:
        body = Writer().f64(-1.0 if timeout is None else float(timeout)).body()
        return bool(self._call(Op.FLUSH, body, False, lambda r: r.u8()))

    def status(self) -> dict[str, Any] | None:
        """The server's status (tiers, usage, sessions), or None when it is not reachable."""
        blob = self._call(Op.STATUS, b"", None, lambda r: r.blob(1 << 20))
        return json.loads(blob) if blob else None

    def close(self, timeout: float) -> None:
        self._flush_releases()
        self._closed = True
        self._release_due.set()
        s = self._session
        self._session = None
        if s is not None:
            s.close()
        handle, self._map_handle = self._map_handle, None
        if handle is not None and hasattr(handle, "close"):
            try:
                handle.close()
            except Exception:
                logger.warning("releasing the server arena's mapping failed", exc_info=True)


__all__ = ["RemoteChunk", "ServerChunkStore", "server_about"]
