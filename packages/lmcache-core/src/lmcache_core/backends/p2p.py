"""The peer-to-peer tier: on a local miss, pull the chunk from the instance that holds it.

Nothing is copied when storing: ``put`` *advertises* chunks that live in this
process's DRAM tier, in a cluster-wide index, with their address in the
registered arena and their slot's generation word. ``get`` looks keys up in the
index, reads the bytes straight from the owner's arena over a
:class:`~lmcache_core.transport.Transport` (NIXL), one request per peer, and
*then* reads the generation words of the slots it copied. The owner bumps a
slot's word before the slot can be written again (see :mod:`lmcache_core.pool`),
so a word unchanged after the copy completed proves every byte copied is the
published chunk; a changed one (the owner evicted and reused the slot) is a
miss, never wrong KV. This costs one small read per batch instead of hashing
every pulled byte, which on a busy host took a third of the pull's bandwidth.
``p2p_verify_checksums`` adds an xxh3 check of every byte on top, for those
who distrust their fabric.

The index is an existing store, Redis/Valkey (``p2p_index_url``), not a
home-made controller; the :class:`PeerIndex` interface keeps it open for
etcd. Entries expire: each peer keeps a record with a short TTL alive by
heartbeat; an entry whose owner's record is gone is deleted on first touch,
so a dead peer costs a miss, not a hang. A chunk evicted from the owner's DRAM
has its entry removed (batched, from the heartbeat thread).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import xxhash

from lmcache_core.arena import AnonymousArena
from lmcache_core.auth import IndexSigner, require_secret, warn_unauthenticated
from lmcache_core.backends.base import (
    BackendCapabilities,
    BackendContext,
    ChunkAllocator,
    StorageBackend,
)
from lmcache_core.backends.p2p_index import Entry, PeerIndex

__all__ = ["Entry", "P2PBackend", "PeerIndex"]
from lmcache_core.errors import ConfigError
from lmcache_core.keys import CacheKey
from lmcache_core.metrics import Metrics
from lmcache_core.plugins import TRANSPORTS, load_plugin
from lmcache_core.transport import Region, Transport, TransportError

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.layout import KVLayout
    from lmcache_core.pool import Chunk, SlotPool

logger = logging.getLogger(__name__)


class _WrongPeer(Exception):
    """A peer record whose metadata connects to another process."""


class P2PBackend(StorageBackend):
    name = "p2p"
    #: Publishing copies nothing (an index entry per chunk), and a peer must
    #: see a chunk as soon as the request that stored it finishes
    #: (disaggregated prefill hands the request over right then).
    write_behind = False
    #: Chunks per transfer request when checksums are on: small enough to hash
    #: one batch while the next is in flight, large enough to keep the link busy.
    CHECKSUM_BATCH = 2
    #: Generation words read back per request (8 bytes each).
    GENERATION_WORDS = 4096
    capabilities = BackendCapabilities(shared=True, exact_usage=False, listing=False)

    def __init__(
        self,
        transport: Transport,
        index: PeerIndex,
        pool: SlotPool,
        *,
        metrics: Metrics | None = None,
        timeout_s: float = 5.0,
        verify_checksums: bool = False,
        layout: KVLayout | None = None,
    ) -> None:
        self.layout = layout
        self.transport = transport
        self.index = index
        self.pool = pool
        self.metrics = metrics if metrics is not None else Metrics()
        self.timeout_s = timeout_s
        self.verify_checksums = verify_checksums
        self._lo = pool.arena.address
        self._hi = self._lo + pool.arena.size
        pool.arena.prefault()  # peers' reads into unfaulted pages crawl (see Arena.prefault)
        transport.register(pool.arena)
        transport.register(pool.generation_arena)  # peers read our words after our bytes
        # Where the words we read from peers land; replaced if a read of them times out.
        self._words_lock = threading.Lock()
        self._words = self._new_words_buffer()
        self._metadata = transport.metadata()
        self._published: set[CacheKey] = set()
        self._evicted: list[CacheKey] = []
        #: Chunks (and word buffers) a timed-out read may still write into: held
        #: forever (a leak of a few slots beats wrong KV in a reused one).
        self._quarantine: list[object] = []
        self._verifier = ThreadPoolExecutor(1, thread_name_prefix="lmcache-p2p-verify")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.index.announce(transport.peer_id, self._metadata)
        self._heartbeat = threading.Thread(
            target=self._beat, name="lmcache-p2p-heartbeat", daemon=True
        )
        self._heartbeat.start()

    @classmethod
    def from_config(cls, config: CacheConfig, context: BackendContext) -> P2PBackend:
        if not config.p2p_index_url:
            raise ConfigError(["enable_p2p needs p2p_index_url, e.g. redis://index-host:6379"])
        require_secret(config, context.secret, "the p2p index (p2p_index_url)")
        signer = IndexSigner(context.secret) if context.secret is not None else None
        if signer is None:
            warn_unauthenticated("p2p index")
        context.metrics.set("lmcache:tier_authenticated", int(signer is not None), tier=cls.name)
        transport = load_plugin(TRANSPORTS, config.p2p_transport)()
        index = PeerIndex(config.p2p_index_url, peer_ttl_s=config.p2p_peer_ttl, signer=signer)
        return cls(
            transport,
            index,
            context.pool,
            metrics=context.metrics,
            timeout_s=config.blocking_timeout_secs,
            verify_checksums=config.p2p_verify_checksums,
            layout=context.layout,
        )

    def _new_words_buffer(self) -> tuple[AnonymousArena, memoryview]:
        arena = AnonymousArena(8 * self.GENERATION_WORDS)
        self.transport.register(arena)
        return arena, arena.view().cast("Q")

    # ------------------------------------------------------------------ liveness

    def _beat(self) -> None:
        period = max(0.05, self.index.peer_ttl_ms / 3000)
        while not self._stop.wait(period):
            try:
                self.index.announce(self.transport.peer_id, self._metadata)
                self._flush_evicted()
            except Exception:
                logger.warning("p2p heartbeat failed (index unreachable?)", exc_info=True)

    def evicted_upstream(self, key: CacheKey) -> None:
        """The DRAM tier dropped ``key``: its entry must go (done by the heartbeat)."""
        if key in self._published:
            with self._lock:
                self._evicted.append(key)

    def _flush_evicted(self) -> None:
        with self._lock:
            keys, self._evicted = self._evicted, []
            for k in keys:
                self._published.discard(k)
        if keys:
            self.index.unpublish(keys, self.transport.peer_id)

    # ------------------------------------------------------------------ the protocol

    def _live_entries(
        self, keys: Sequence[CacheKey]
    ) -> tuple[list[Entry | None], dict[str, bytes | None]]:
        """Entries of ``keys`` whose owner is alive (else None), and the owners' metadata."""
        me = self.transport.peer_id
        entries, peers = self.index.lookup_with_peers(keys, exclude=me)
        self._count_rejected()
        dead = []
        out: list[Entry | None] = []
        for key, e in zip(keys, entries):
            if e is None or e.peer == me:
                out.append(None)  # our own chunks are in our DRAM tier, or gone
            elif peers.get(e.peer) is None:
                dead.append(key)  # the owner's record expired: it is gone
                out.append(None)
            else:
                out.append(e)
        if dead:
            self.index.drop(dead)
            self.metrics.inc("lmcache:num_failures", len(dead), tier=self.name, op="dead_peer")
        return out, peers

    def _count_rejected(self) -> None:
        n, self.index.rejected = self.index.rejected, 0
        if n:
            logger.warning("p2p: %d index values failed their checks (forged or malformed)", n)
            self.metrics.inc("lmcache:num_forged_chunks", n, tier=self.name)
        n, self.index.removed = self.index.removed, 0
        if n:
            logger.warning(
                "p2p: %d index values were larger than an entry or record can be, or not "
                "strings; deleted",
                n,
            )
            self.metrics.inc("lmcache:num_corrupt_chunks", n, tier=self.name)

    def _usable(self, e: Entry) -> bool:
        """An entry this reader can pull: its size is a chunk's, for its tokens, in this layout."""
        if e.nbytes > self.pool.slot_bytes:
            return False
        if self.layout is not None and e.nbytes != self.layout.chunk_bytes(e.num_tokens):
            return False
        return not (self.verify_checksums and not e.checksum)

    def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        if not keys:
            return []
        return [e is not None and self._usable(e) for e in self._live_entries(keys)[0]]

    def get(self, keys: Sequence[CacheKey], allocator: ChunkAllocator) -> list[Chunk | None]:
        out: list[Chunk | None] = [None] * len(keys)
        if not keys:
            return out
        entries, metadata = self._live_entries(keys)
        by_peer: dict[str, list[int]] = {}
        misfits = []
        for i, e in enumerate(entries):
            if e is None:
                continue
            if not self._usable(e):  # also: the owner published no checksum we could check
                misfits.append(keys[i])
                continue
            by_peer.setdefault(e.peer, []).append(i)
        if misfits:
            self.metrics.inc("lmcache:num_corrupt_chunks", len(misfits), tier=self.name)
        for peer, idx in by_peer.items():
            md = metadata.get(peer)
            if md is None:
                continue
            chunks: list[tuple[int, Chunk]] = []
            for i in idx:
                e = entries[i]
                assert e is not None
                c = allocator(keys[i], e.num_tokens, e.nbytes)
                if c is None:
                    break  # no memory: the rest are misses
                chunks.append((i, c))
            if not chunks:
                continue
            stale: list[CacheKey] = []
            corrupt: list[CacheKey] = []
            nbytes = 0
            try:
                named = self.transport.connect(md)
                if named != peer:  # a record with another process's metadata
                    raise _WrongPeer(f"record of {peer!r} names {named!r}")
                nbytes = self._pull(peer, chunks, entries, keys, out, stale, corrupt)
            except Exception as err:  # any failure is a miss; nothing escapes to the engine
                in_flight = isinstance(err, TransportError) and err.in_flight
                logger.warning("p2p: reading %d chunks from %s failed: %s", len(chunks), peer, err)
                self.metrics.inc("lmcache:num_failures", tier=self.name, op="read")
                if isinstance(err, _WrongPeer):
                    self.metrics.inc("lmcache:num_forged_chunks", len(chunks), tier=self.name)
                try:
                    self.transport.disconnect(peer)
                except Exception:
                    pass
                for i, c in chunks:
                    if out[i] is c:
                        out[i] = None
                    if in_flight:
                        # Bytes may still land in these slots: never reuse them.
                        self._quarantine.append(c)
                    else:
                        c.release()
                continue
            if stale:
                self.metrics.inc("lmcache:num_stale_chunks", len(stale), tier=self.name)
            if corrupt:
                logger.warning("p2p: %d chunks from %s failed their checksum", len(corrupt), peer)
                self.metrics.inc("lmcache:num_corrupt_chunks", len(corrupt), tier=self.name)
            if stale or corrupt:
                self.index.unpublish(stale + corrupt, peer)
            if nbytes:
                self.metrics.inc("lmcache:retrieved_bytes", nbytes, tier=self.name)
        return out

    def _pull(
        self,
        peer: str,
        chunks: list[tuple[int, Chunk]],
        entries: list[Entry | None],
        keys: Sequence[CacheKey],
        out: list[Chunk | None],
        stale: list[CacheKey],
        corrupt: list[CacheKey],
    ) -> int:
        """Read ``chunks`` from ``peer``, then their slots' generation words; keep the valid ones.

        The words are read only once every byte has arrived (a separate request
        after the data request completed): that ordering is what makes an
        unchanged word prove the bytes unchanged.
        """
        pairs = []
        for i, c in chunks:
            e = entries[i]
            assert e is not None
            pairs.append((Region(c.address, c.nbytes), Region(e.address, e.nbytes)))
        if self.verify_checksums:
            hashed = self._read_and_hash(peer, chunks, pairs, entries)
        else:
            self.transport.read(peer, pairs, timeout=self.timeout_s)
            hashed = [True] * len(chunks)
        try:
            current = self._read_generations(peer, [entries[i] for i, _ in chunks])
        except TransportError as err:
            # Only the word buffer (already set aside) can still be written: the
            # chunks' own reads completed, so their slots may be reused.
            raise TransportError(str(err), in_flight=False) from None
        nbytes = 0
        for (i, c), ok, gen in zip(chunks, hashed, current):
            e = entries[i]
            assert e is not None
            if gen != e.generation or not ok:
                # A moved word: the owner reused the slot since it published (stale,
                # an ordinary race). Same word, bad hash: the bytes were damaged.
                (stale if gen != e.generation else corrupt).append(keys[i])
                c.release()
                continue
            out[i] = c
            nbytes += c.nbytes
        return nbytes

    def _read_generations(self, peer: str, entries: list[Entry | None]) -> list[int]:
        current: list[int] = []
        with self._words_lock:
            for lo in range(0, len(entries), self.GENERATION_WORDS):
                part = entries[lo : lo + self.GENERATION_WORDS]
                arena, words = self._words
                pairs = []
                for j, e in enumerate(part):
                    assert e is not None
                    pairs.append(
                        (Region(arena.address + 8 * j, 8), Region(e.generation_address, 8))
                    )
                try:
                    self.transport.read(peer, pairs, timeout=self.timeout_s)
                except TransportError as err:
                    if err.in_flight:  # words may still land there: never reuse the buffer
                        self._quarantine.append(self._words)
                        self._words = self._new_words_buffer()
                    raise
                current.extend(words[: len(part)])
        return current

    def _read_and_hash(
        self,
        peer: str,
        chunks: list[tuple[int, Chunk]],
        pairs: list[tuple[Region, Region]],
        entries: list[Entry | None],
    ) -> list[bool]:
        """Read in batches, hashing batch k on a thread while batch k+1 moves."""
        step = self.CHECKSUM_BATCH

        def verify(batch: list[tuple[int, Chunk]]) -> list[bool]:
            oks = []
            for i, c in batch:
                e = entries[i]
                assert e is not None
                oks.append(xxhash.xxh3_64_hexdigest(c.view) == e.checksum)
            return oks

        futures = []
        try:
            for lo in range(0, len(chunks), step):
                self.transport.read(peer, pairs[lo : lo + step], timeout=self.timeout_s)
                futures.append(self._verifier.submit(verify, chunks[lo : lo + step]))
        finally:
            results = [f.result() for f in futures]  # no check outlives a slot
        return [ok for oks in results for ok in oks]

    def put(self, chunks: Sequence[Chunk]) -> list[bool]:
        items = []
        ok = []
        for c in chunks:
            inside = (
                c.pool is self.pool and self._lo <= c.address and c.address + c.nbytes <= self._hi
            )
            ok.append(inside)
            if inside:
                entry = Entry(
                    self.transport.peer_id,
                    c.address,
                    c.nbytes,
                    c.num_tokens,
                    self.pool.generation_address(c.slot),
                    self.pool.generation(c.slot),
                    xxhash.xxh3_64_hexdigest(c.view) if self.verify_checksums else "",
                )
                items.append((c.key, entry))
        if items:
            self.index.publish(items)
            with self._lock:
                self._published.update(k for k, _ in items)
        return ok

    def remove(self, keys: Sequence[CacheKey]) -> int:
        with self._lock:
            for k in keys:
                self._published.discard(k)
        return self.index.unpublish(list(keys), self.transport.peer_id)

    @property
    def used_bytes(self) -> int:
        return 0

    @property
    def capacity_bytes(self) -> int:
        return sys.maxsize

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._heartbeat.join(5)
        try:
            self.index.retire(self.transport.peer_id)  # peers see us gone at once
            with self._lock:
                mine = list(self._published)
                self._published.clear()
            for i in range(0, len(mine), 1000):
                self.index.unpublish(mine[i : i + 1000], self.transport.peer_id)
        except Exception:
            logger.warning("p2p: cleaning the index at close failed", exc_info=True)
        self._verifier.shutdown(wait=True)
        self.transport.close()
        if not self._quarantine:
            self._words[1].release()
            self._words[0].close()
