"""The memory pool: fixed-size slots over one arena, and the chunks that live in them.

Why fixed-size slots: every full chunk of one engine has the same size, so
with one slot per chunk any free slot fits any chunk and the pool can never
fail from fragmentation while a slot is free. A trailing partial chunk takes
a whole slot (at most one per prompt).

A :class:`Chunk` is a view into the arena, never a copy. It is reference
counted: the tier that indexes it holds one reference, every reader holds one,
and the slot returns to the pool when the last one is released. So a chunk
being read stays valid even if it is evicted meanwhile.

Each slot has a *generation* word, bumped whenever the slot returns to the
free list, before anyone can write into it again. A reader in another process
(the peer-to-peer tier) that copied a chunk and then sees the slot's generation
unchanged knows the bytes it copied were never overwritten: optimistic
validation, as FaRM does over RDMA, instead of hashing every byte pulled.
The words live in their own small arena so a transport can register it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from lmcache_core.arena import AnonymousArena, Arena
from lmcache_core.errors import ChunkTooLargeError, ConfigError
from lmcache_core.sizes import format_size

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig
    from lmcache_core.keys import CacheKey

logger = logging.getLogger(__name__)

SLOT_ALIGNMENT = 4096
#: Slots start this far past a page boundary. glibc's ``rep movsb`` memcpy runs
#: about 8x slower when ``dst - src`` modulo 4096 is small and positive (4K
#: aliasing), and engine tensors start just past page boundaries (malloc puts
#: large blocks at page + 16 or + 64). Half a page away is far from both
#: directions of copy. Measured: scatter of 32 KiB blocks from a page-aligned
#: slot into a page+16 tensor ran at 1.5 GB/s, from a page+2048 slot at 11 GB/s.
SLOT_OFFSET = 2048


class Chunk:
    """One chunk's bytes in a pool slot, with its key and token count."""

    __slots__ = ("_refs", "key", "nbytes", "num_tokens", "pool", "slot", "view")

    def __init__(
        self, pool: SlotPool, slot: int, key: CacheKey, num_tokens: int, nbytes: int
    ) -> None:
        self.pool = pool
        self.slot = slot
        self.key = key
        self.num_tokens = num_tokens
        self.nbytes = nbytes
        self.view = pool._slot_view(slot, nbytes)
        self._refs = 1

    @property
    def refs(self) -> int:
        return self._refs

    @property
    def address(self) -> int:
        """Address of the first byte, for C kernels."""
        return self.pool.arena.address + self.pool._slot_start(self.slot)

    def retain(self) -> Chunk:
        with self.pool._lock:
            if self._refs <= 0:
                raise RuntimeError("retain() of a released chunk")
            self._refs += 1
        return self

    def release(self) -> None:
        with self.pool._lock:
            if self._refs <= 0:
                raise RuntimeError("release() of a chunk that was already released")
            self._refs -= 1
            if self._refs == 0:
                # Bump before the slot can be reused (see the module docstring).
                gen = self.pool._generation
                gen[self.slot] = (gen[self.slot] + 1) & 0xFFFF_FFFF_FFFF_FFFF
                self.pool._free.append(self.slot)

    def __enter__(self) -> Chunk:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (
            f"Chunk({self.key!r}, tokens={self.num_tokens}, bytes={self.nbytes}, refs={self._refs})"
        )


class SlotPool:
    """Fixed-size slots over one :class:`Arena`."""

    def __init__(self, arena: Arena, slot_bytes: int) -> None:
        if slot_bytes <= 0:
            raise ValueError(f"slot size must be positive, got {slot_bytes}")
        slot_bytes = -(-slot_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        if arena.size < slot_bytes + SLOT_OFFSET:
            raise ChunkTooLargeError(
                f"the memory pool of {format_size(arena.size)} cannot hold one chunk of "
                f"{format_size(slot_bytes)}; raise max_local_cpu_size to at least "
                f"{format_size(slot_bytes)} or lower chunk_size"
            )
        self.arena = arena
        self.slot_bytes = slot_bytes
        self.num_slots = (arena.size - SLOT_OFFSET) // slot_bytes
        self._view = arena.view()
        self._lock = threading.Lock()
        # LIFO free list: recently freed slots are warm in cache and TLB.
        self._free: list[int] = list(range(self.num_slots - 1, -1, -1))
        #: One 8-byte generation word per slot (see the module docstring).
        self.generation_arena: Arena = AnonymousArena(8 * self.num_slots)
        self._generation = self.generation_arena.view().cast("Q")

    @classmethod
    def anonymous(cls, capacity_bytes: int, slot_bytes: int) -> SlotPool:
        slot = -(-slot_bytes // SLOT_ALIGNMENT) * SLOT_ALIGNMENT
        if capacity_bytes < slot:
            raise ChunkTooLargeError(
                f"a memory pool of {format_size(capacity_bytes)} cannot hold one chunk of "
                f"{format_size(slot)}; raise max_local_cpu_size to at least {format_size(slot)} "
                "or lower chunk_size"
            )
        return cls(AnonymousArena((capacity_bytes // slot) * slot + SLOT_OFFSET), slot)

    @property
    def capacity_bytes(self) -> int:
        return self.num_slots * self.slot_bytes

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def generation(self, slot: int) -> int:
        """How many times ``slot`` has been freed."""
        return int(self._generation[slot])

    def generation_address(self, slot: int) -> int:
        """Address of ``slot``'s generation word, for peers that validate reads."""
        return self.generation_arena.address + 8 * slot

    def _slot_start(self, slot: int) -> int:
        return SLOT_OFFSET + slot * self.slot_bytes

    def _slot_view(self, slot: int, nbytes: int) -> memoryview:
        start = self._slot_start(slot)
        return self._view[start : start + nbytes]

    def allocate(self, key: CacheKey, num_tokens: int, nbytes: int) -> Chunk | None:
        """A new chunk with one reference, or None when every slot is taken."""
        if nbytes > self.slot_bytes:
            raise ChunkTooLargeError(
                f"a chunk of {nbytes} bytes does not fit the pool's {self.slot_bytes}-byte slots"
            )
        with self._lock:
            if not self._free:
                return None
            slot = self._free.pop()
        return Chunk(self, slot, key, num_tokens, nbytes)

    def close(self) -> None:
        self._view = memoryview(b"")
        self.arena.close()
        self._generation.release()
        # Chunks released after close (late readers) bump a private copy.
        self._generation = memoryview(bytearray(8 * self.num_slots)).cast("Q")
        self.generation_arena.close()


def dram_arena(config: CacheConfig, slot_bytes: int, bytes_per_token: int) -> AnonymousArena:
    """The DRAM tier's memory: ``max_local_cpu_size`` bytes, made resident at start when
    ``local_cpu_prefault`` (first-touch faults would otherwise land on the first stores)."""
    capacity = config.max_local_cpu_size
    if capacity < slot_bytes:
        raise ConfigError(
            [
                f"max_local_cpu_size={format_size(capacity)} cannot hold one chunk of "
                f"{format_size(slot_bytes)} ({config.chunk_size} tokens x "
                f"{bytes_per_token} bytes); raise it to at least "
                f"{format_size(slot_bytes)} or lower chunk_size"
            ]
        )
    try:
        arena = AnonymousArena(capacity + SLOT_OFFSET)
        if config.local_cpu_prefault:
            t0 = time.perf_counter()
            arena.prefault()
            logger.info(
                "DRAM tier: %s made resident in %.2f s (local_cpu_prefault)",
                format_size(capacity),
                time.perf_counter() - t0,
            )
    except OSError as e:
        fix = ", or set local_cpu_prefault: false" if config.local_cpu_prefault else ""
        raise ConfigError(
            [
                f"max_local_cpu_size={format_size(capacity)} cannot be reserved "
                f"({e.strerror}); lower it (a bare number is GB: write 512MiB, 5GiB){fix}"
            ]
        ) from None
    return arena
