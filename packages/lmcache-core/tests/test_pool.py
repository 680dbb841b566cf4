"""The slot pool and the arena."""

from __future__ import annotations

import errno

import pytest
from lmcache_core.arena import AnonymousArena
from lmcache_core.errors import ChunkTooLargeError
from lmcache_core.pool import SLOT_ALIGNMENT, SLOT_OFFSET, SlotPool
from lmcache_core.testing import test_key


def test_pool_hands_out_every_slot_once_then_none():
    pool = SlotPool.anonymous(8 * 8192, 8192)
    assert pool.num_slots == 8
    chunks = [pool.allocate(test_key(i), 1, 8192) for i in range(8)]
    assert all(c is not None for c in chunks)
    assert len({c.slot for c in chunks}) == 8
    assert pool.allocate(test_key(99), 1, 10) is None
    chunks[3].release()
    again = pool.allocate(test_key(100), 1, 8192)
    assert again is not None and again.slot == chunks[3].slot
    pool.close()


def test_chunk_views_do_not_overlap_and_are_writable():
    pool = SlotPool.anonymous(4 * 4096, 4096)
    chunks = [pool.allocate(test_key(i), 1, 4096) for i in range(4)]
    for i, c in enumerate(chunks):
        c.view[:] = bytes([i + 1]) * 4096
    for i, c in enumerate(chunks):
        assert bytes(c.view) == bytes([i + 1]) * 4096


def test_slots_are_aligned_and_offset_from_page_boundaries():
    arena = AnonymousArena(3 * 4096 + SLOT_OFFSET)
    pool = SlotPool(arena, 4000)
    assert pool.slot_bytes == SLOT_ALIGNMENT
    c = pool.allocate(test_key(1), 1, 100)
    assert (c.address - arena.address) % SLOT_ALIGNMENT == SLOT_OFFSET
    assert c.address % 4096 == SLOT_OFFSET
    assert arena.address % 4096 == 0


def test_refcounts_protect_slots_and_catch_double_release():
    pool = SlotPool.anonymous(4096, 4096)
    c = pool.allocate(test_key(1), 1, 4096)
    c.retain()
    c.release()
    assert pool.free_slots == 0
    c.release()
    assert pool.free_slots == 1
    with pytest.raises(RuntimeError, match="already released"):
        c.release()
    with pytest.raises(RuntimeError, match="released chunk"):
        c.retain()


def test_context_manager_releases():
    pool = SlotPool.anonymous(4096, 4096)
    with pool.allocate(test_key(1), 1, 4096):
        assert pool.free_slots == 0
    assert pool.free_slots == 1


def test_too_large_chunks_and_too_small_pools_say_what_to_change():
    pool = SlotPool.anonymous(2 * 4096, 4096)
    with pytest.raises(ChunkTooLargeError, match="does not fit"):
        pool.allocate(test_key(1), 1, 4097)
    with pytest.raises(ChunkTooLargeError, match="raise max_local_cpu_size to at least 32.0 MiB"):
        SlotPool.anonymous(1024**2, 32 * 1024**2)


def test_arena_close_with_views_alive_does_not_crash():
    arena = AnonymousArena(8192 + SLOT_OFFSET)
    pool = SlotPool(arena, 4096)
    c = pool.allocate(test_key(1), 1, 4096)
    c.view[:4] = b"abcd"
    pool.close()
    arena.close()  # idempotent
    with pytest.raises(ValueError):
        AnonymousArena(0)


def test_a_slot_generation_changes_before_the_slot_can_be_written_again():
    """Peers validate pulled bytes by the slot's generation: it must move on every reuse."""
    import ctypes

    pool = SlotPool.anonymous(2 * 4096, 4096)
    a = pool.allocate(test_key(1), 1, 4096)
    g0 = pool.generation(a.slot)
    word = ctypes.c_uint64.from_address(pool.generation_address(a.slot))
    assert word.value == g0  # what a peer reads at that address
    b = a.retain()
    a.release()
    assert pool.generation(b.slot) == g0, "still referenced: same bytes, same generation"
    b.release()
    assert word.value == g0 + 1
    again = pool.allocate(test_key(2), 1, 4096)
    assert again.slot == a.slot and pool.generation(again.slot) == g0 + 1
    other = pool.allocate(test_key(3), 1, 4096)
    assert pool.generation(other.slot) == 0
    del word
    pool.close()
    again.release()  # a late release after close must not crash


@pytest.mark.parametrize("madvise_works", [True, False])
def test_prefault_keeps_the_arena_contents(monkeypatch, madvise_works):
    arena = AnonymousArena(3 * 4096 + 100)
    view = arena.view()
    view[0:5] = b"hello"
    view[-3:] = b"end"
    if not madvise_works:  # the fallback of kernels without MADV_POPULATE_WRITE

        def refuse(*a):
            raise OSError(errno.EINVAL, "Invalid argument")

        monkeypatch.setattr(arena, "_mmap", _NoMadvise(arena._mmap, refuse))
    arena.prefault()
    assert bytes(view[0:5]) == b"hello" and bytes(view[-3:]) == b"end"
    assert bytes(view[5:-3]) == bytes(len(view) - 8)
    del view
    arena.close()


class _NoMadvise:
    def __init__(self, mm, madvise):
        self._mm, self.madvise = mm, madvise

    def __getattr__(self, name):
        return getattr(self._mm, name)
