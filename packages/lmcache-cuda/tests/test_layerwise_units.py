"""Layer-wise copies (``use_layerwise``), one hook at a time, on CPU tensors.

A load writes layer ``i`` exactly when ``wait_layer(i)`` is called (vLLM's
``wait_for_layer_load``) and nothing before; a save reads layer ``i`` when
``read_layer(i)`` is called (``save_kv_layer``). The real-engine test
(lmcache-vllm's ``test_vllm_engine.py::test_layerwise_*``) runs the same in
vLLM; the GPU test here checks the stream ordering of the CUDA path.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lmcache_core.layout import KVLayout  # noqa: E402
from lmcache_core.transfer import AsyncKVReader, AsyncKVWriter, ChunkIO  # noqa: E402
from lmcache_cuda.layerwise import LayerMemories, LayerwiseReader, LayerwiseWriter  # noqa: E402
from lmcache_cuda.reference import TorchPagedKV  # noqa: E402
from lmcache_cuda.strided import strided_layers  # noqa: E402

LAYOUT = KVLayout("vllm_bhnc", "bfloat16", 3, 2, 8, 16)
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
TABLE = [5, 1, 6]


def _chunks(src_layers) -> tuple[list[ChunkIO], bytearray]:
    """Two chunks ([0, 32), [32, 48)) of the source's KV, in chunk format."""
    buf = bytearray(LAYOUT.chunk_bytes(32) + LAYOUT.chunk_bytes(16))
    view = memoryview(buf)
    a, b = view[: LAYOUT.chunk_bytes(32)], view[LAYOUT.chunk_bytes(32) :]
    ios = [ChunkIO(0, 32, a), ChunkIO(32, 48, b)]
    TorchPagedKV(LAYOUT, src_layers, TABLE).read_chunks(ios)
    return ios, buf


def _layer_bytes(layers, i: int) -> bytes:
    one = KVLayout("vllm_bhnc", "bfloat16", 1, 2, 8, 16)
    out = bytearray(one.chunk_bytes(48))
    TorchPagedKV(one, [layers[i]], TABLE).read_chunks([ChunkIO(0, 48, memoryview(out))])
    return bytes(out)


def test_a_load_writes_each_layer_at_its_hook_and_only_then():
    src, _ = strided_layers(LAYOUT, 8, "LBNHC", seed=1)
    dst, _ = strided_layers(LAYOUT, 8, "LBNHC", fill=False)
    mem = LayerMemories(LAYOUT, dst, NAMES)
    ios, _ = _chunks(src)
    writer = LayerwiseWriter(mem, TABLE)
    assert isinstance(writer, AsyncKVWriter)
    completion = writer.start_write(ios)
    assert not any(bool(t.view(torch.int16).any()) for t in dst)  # nothing before the hooks
    assert not completion.done()
    writer.wait_layer(1)
    assert _layer_bytes(dst, 1) == _layer_bytes(src, 1)
    assert not bool(dst[0].view(torch.int16).any()) and not bool(dst[2].view(torch.int16).any())
    writer.finish()  # the layers vLLM did not wait for
    assert completion.done()
    for i in range(3):
        assert _layer_bytes(dst, i) == _layer_bytes(src, i)


def test_a_save_reads_each_layer_at_its_hook():
    src, _ = strided_layers(LAYOUT, 8, "BLHNC", seed=2)
    mem = LayerMemories(LAYOUT, src, NAMES)
    _, expect = _chunks(src)
    buf = bytearray(len(expect))
    view = memoryview(buf)
    ios = [
        ChunkIO(0, 32, view[: LAYOUT.chunk_bytes(32)]),
        ChunkIO(32, 48, view[LAYOUT.chunk_bytes(32) :]),
    ]
    reader = LayerwiseReader(mem, TABLE)
    assert isinstance(reader, AsyncKVReader)
    completion = reader.start_read(ios)
    assert not completion.done()
    with pytest.raises(RuntimeError, match="before every layer"):
        completion.wait()
    reader.read_layer(0)
    one = KVLayout("vllm_bhnc", "bfloat16", 1, 2, 8, 16).chunk_bytes(32)
    assert buf[:one] == expect[:one] and not any(buf[one : 3 * one])
    reader.finish()
    completion.wait()
    assert completion.done() and buf == expect


class Broken:
    def __call__(self, block_ids):
        return self

    def write_chunks(self, chunks):
        raise OSError("device lost")

    read_chunks = write_chunks


def test_a_failed_layer_copy_never_raises_into_the_forward():
    src, _ = strided_layers(LAYOUT, 8, "LBNHC", seed=3)
    dst, _ = strided_layers(LAYOUT, 8, "LBNHC", fill=False)
    mem = LayerMemories(LAYOUT, dst, NAMES)
    mem.memories[1] = Broken()
    ios, _ = _chunks(src)
    writer = LayerwiseWriter(mem, TABLE)
    writer.start_write(ios)
    for i in range(3):
        writer.wait_layer(i)  # what vLLM calls: must not raise
    assert isinstance(writer.error, OSError)  # the worker reports the blocks instead
    reader = LayerwiseReader(LayerMemories(LAYOUT, src, NAMES), TABLE)
    reader.mem.memories[2] = Broken()
    reader.start_read(ios)
    reader.finish()
    with pytest.raises(RuntimeError, match="device lost"):
        reader.wait()  # the staged store is committed as a failure: nothing stored


@pytest.mark.gpu
def test_on_a_gpu_the_engine_stream_waits_for_each_layer_only():
    from lmcache_core.pool import SLOT_OFFSET, SlotPool
    from lmcache_cuda.pinned import PinnedArena

    src, _ = strided_layers(LAYOUT, 8, "LBNHC", device="cuda", seed=4)
    dst, _ = strided_layers(LAYOUT, 8, "LBNHC", device="cuda", fill=False)
    n = LAYOUT.chunk_bytes(48)
    pool = SlotPool(PinnedArena(n + SLOT_OFFSET + 4096), n)
    slot = pool.allocate(None, 48, n)  # type: ignore[arg-type]
    io = ChunkIO(0, 48, slot.view[:n])
    TorchPagedKV(LAYOUT, src, TABLE).read_chunks([io])
    from lmcache_cuda.cuda import CudaPagedMemory

    whole = CudaPagedMemory(LAYOUT, dst)
    mem = LayerMemories(LAYOUT, dst, NAMES, whole=whole)
    with torch.cuda.stream(whole.load_stream()):
        torch.cuda._sleep(200_000_000)  # the copies start late
    writer = LayerwiseWriter(mem, TABLE)
    writer.start_write([io])
    snapshots = []
    for i in range(3):
        writer.wait_layer(i)  # the engine's stream waits for layer i's copy ...
        snapshots.append(dst[i].clone())  # ... so what it reads next is the loaded KV
    torch.cuda.synchronize()
    assert writer.done()
    for i in range(3):
        assert torch.equal(snapshots[i].view(torch.int16)[TABLE], src[i].view(torch.int16)[TABLE])
    pool.close()
