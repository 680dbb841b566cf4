"""Saves that do not hold up the engine's step (GPU): ``start_read`` and ``fence_saves``.

``start_read`` queues the gather on a side stream after the work already on
the engine's stream and returns before it ran; ``fence_saves`` makes the
engine's next writes to KV wait for it. The pure-Python part (staging,
committing, the queue) is tested on any machine in lmcache-core's
``test_staged_store.py``; these need a CUDA device.
"""

from __future__ import annotations

import pytest
from lmcache_core.layout import KVLayout
from lmcache_core.pool import SLOT_OFFSET, SlotPool
from lmcache_core.transfer import AsyncKVReader, ChunkIO

LAYOUT = KVLayout("vllm_bhnc", "bfloat16", 4, 2, 64, 16)
CYCLES = 200_000_000  # ~0.1 s of a busy kernel on current GPUs


def _setup(fill_value: int):
    import torch
    from lmcache_cuda.cuda import CudaPagedMemory
    from lmcache_cuda.pinned import PinnedArena
    from lmcache_cuda.strided import strided_layers

    views, buf = strided_layers(LAYOUT, 16, device="cuda", fill=False)
    buf.fill_(fill_value)
    n = LAYOUT.chunk_bytes(64)
    pool = SlotPool(PinnedArena(2 * n + SLOT_OFFSET + 4096), n)
    slot = pool.allocate(None, 64, n)  # type: ignore[arg-type]
    torch.cuda.synchronize()
    return CudaPagedMemory(LAYOUT, views), buf, pool, slot, n


@pytest.mark.gpu
def test_start_read_returns_before_the_copy_and_sees_the_steps_writes():
    import torch

    mem, buf, pool, slot, n = _setup(1)
    kv = mem.request([3, 1, 7, 5])
    assert isinstance(kv, AsyncKVReader)
    # The "step": a long kernel, then the KV it computes (written after the sleep).
    torch.cuda._sleep(CYCLES)
    buf.fill_(7)
    completion = kv.start_read([ChunkIO(0, 64, slot.view[:n])])
    assert not completion.done()  # the host did not wait for the device
    completion.wait()
    got = bytes(slot.view[:n])
    assert got == bytes([7, 0]) * (n // 2)  # int16 7, little-endian: the step's values
    pool.close()


@pytest.mark.gpu
def test_the_fence_keeps_the_next_step_from_overwriting_blocks_being_saved():
    import torch

    mem, buf, pool, slot, n = _setup(1)
    side = mem.save_stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(CYCLES)  # the save stream is busy: the gather will start late
    completion = mem.request([0, 1, 2, 3]).start_read([ChunkIO(0, 64, slot.view[:n])])
    mem.fence_saves()
    buf.fill_(9)  # the next step writes the same blocks (a finished request's, reused)
    torch.cuda.synchronize()
    completion.wait()
    assert bytes(slot.view[:n]) == bytes([1, 0]) * (n // 2)  # what the save was asked for
    assert bool((buf == 9).all())
    pool.close()
