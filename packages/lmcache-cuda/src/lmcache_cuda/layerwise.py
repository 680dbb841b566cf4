"""Layer-wise loads and saves (the ``use_layerwise`` config key).

vLLM calls ``wait_for_layer_load(layer)`` before each attention layer runs and
``save_kv_layer(layer)`` after it. With this path on, a load's chunks are
fetched from the tiers in ``start_load_kv`` but layer ``i`` is copied into
vLLM's blocks only for attention ``i``, and a save copies layer ``i`` out as
soon as attention ``i`` is done:

* on a GPU, every layer's scatter is queued at once on a load stream, each
  with its own event, and ``wait_for_layer_load(i)`` makes vLLM's stream wait
  for event ``i`` only: the copy of layer ``i + 1`` runs under attention
  ``i``. Each layer's gather is queued on the save stream right after its
  attention, so saves run under the later layers;
* on the CPU the copies are synchronous, done at the same two points, so the
  ordering (the layer's KV in place exactly when its attention reads it) is
  what the real-engine tests check there.

Chunks are layer-major in every chunk format, so layer ``i`` of a chunk is
one contiguous slice of its buffer and moves through a one-layer view of
the same kernels. Engine-neutral: lmcache-vllm calls it from its hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmcache_core.layout import KVLayout
from lmcache_core.transfer import ChunkIO

import lmcache_cuda


class LayerMemories:
    """One single-layer transfer memory per layer, and the slices of chunk buffers."""

    def __init__(
        self,
        layout: KVLayout,
        layers: Sequence[Any],
        names: Sequence[str],
        whole: Any = None,
    ) -> None:
        self.one = KVLayout(
            layout.kind, layout.dtype, 1, layout.num_kv_heads, layout.head_size, layout.block_size
        )
        self.num_layers = len(layers)
        self.memories = [lmcache_cuda.paged_memory(self.one, [t]) for t in layers]
        self.index = {name: i for i, name in enumerate(names)}
        self.on_gpu = getattr(getattr(layers[0], "device", None), "type", "cpu") == "cuda"
        if self.on_gpu and whole is not None:
            # One load stream and one save stream for the whole cache, not one per layer.
            for m in self.memories:
                m._save_stream, m._load_stream = whole.save_stream(), whole.load_stream()

    def fence(self) -> None:
        """Order the engine's stream after every layer's queued save copies (GPU)."""
        for m in self.memories:
            fence = getattr(m, "fence_saves", None)
            if fence is not None:
                fence()

    def kv(self, cache: dict[int, Any], layer: int, block_ids: list[int]) -> Any:
        """Layer ``layer``'s reader/writer for these blocks, made once per request."""
        kv = cache.get(layer)
        if kv is None:
            if self.on_gpu and cache:  # one device copy of the table for every layer
                shared = next(iter(cache.values())).table
                kv = self.memories[layer].request(block_ids, shared)
            else:
                kv = self.memories[layer](block_ids)
            cache[layer] = kv
        return kv

    def slices(self, ios: Sequence[ChunkIO], layer: int) -> list[ChunkIO]:
        out = []
        for io in ios:
            n = self.one.chunk_bytes(io.num_tokens)
            view = io.buffer[layer * n : (layer + 1) * n]
            out.append(ChunkIO(io.start, io.end, view, io.write_from, io.write_until))
        return out


class LayerwiseWriter:
    """A load written layer by layer (``AsyncKVWriter``; its own completion)."""

    def __init__(self, mem: LayerMemories, block_ids: list[int]) -> None:
        self.mem = mem
        self.block_ids = block_ids
        self.ios: list[ChunkIO] = []
        self.written = [False] * mem.num_layers
        self.events: list[Any] = []  # GPU: one completion per layer, on the load stream
        self._kvs: dict[int, Any] = {}
        #: A copy failed inside vLLM's forward: never raised there (the step would fail);
        #: the worker reports these blocks for recomputation instead.
        self.error: BaseException | None = None
        self.blocks_if_failed: list[int] = []

    def start_write(self, chunks: Sequence[ChunkIO]) -> LayerwiseWriter:
        self.ios = list(chunks)
        if self.mem.on_gpu:
            for i in range(self.mem.num_layers):
                kv = self.mem.kv(self._kvs, i, self.block_ids)
                self.events.append(kv.start_write(self.mem.slices(self.ios, i)))
        return self

    def write_chunks(self, chunks: Sequence[ChunkIO]) -> None:  # the whole-chunk fallback
        for i, memory in enumerate(self.mem.memories):
            memory(self.block_ids).write_chunks(self.mem.slices(list(chunks), i))

    def wait_layer(self, i: int) -> None:
        """Layer ``i`` must be in vLLM's blocks before its attention reads them."""
        if self.written[i] or not self.ios:
            return
        self.written[i] = True
        try:
            self._land(i)
        except Exception as e:
            self.error = self.error or e

    def _land(self, i: int) -> None:
        if self.mem.on_gpu:
            import torch

            event = getattr(self.events[i], "event", None)  # None: nothing was queued
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
        else:
            kv = self.mem.kv(self._kvs, i, self.block_ids)
            kv.write_chunks(self.mem.slices(self.ios, i))

    def finish(self) -> None:
        """Write the layers vLLM did not ask for (a step without attention metadata)."""
        for i in range(self.mem.num_layers):
            self.wait_layer(i)

    # Completion
    def done(self) -> bool:
        if not all(self.written):
            return False
        return all(e.done() for e in self.events)

    def wait(self) -> None:
        self.finish()
        for e in self.events:
            e.wait()


class LayerwiseReader:
    """A save read layer by layer, each right after its attention (``AsyncKVReader``)."""

    def __init__(self, mem: LayerMemories, block_ids: list[int]) -> None:
        self.mem = mem
        self.block_ids = block_ids
        self.ios: list[ChunkIO] = []
        self.read = [False] * mem.num_layers
        self.copies: list[Any] = []  # GPU: completions on the save stream
        self._kvs: dict[int, Any] = {}
        self.error: BaseException | None = None  # a layer's copy failed: store nothing

    def start_read(self, chunks: Sequence[ChunkIO]) -> LayerwiseReader:
        self.ios = list(chunks)  # the slots to fill; the KV is not computed yet
        return self

    def read_chunks(self, chunks: Sequence[ChunkIO]) -> None:  # the whole-chunk fallback
        for i, memory in enumerate(self.mem.memories):
            memory(self.block_ids).read_chunks(self.mem.slices(list(chunks), i))

    def read_layer(self, i: int) -> None:
        """Attention ``i`` is done: layer ``i``'s KV of this step is complete."""
        if self.read[i] or not self.ios:
            return
        self.read[i] = True
        try:
            kv = self.mem.kv(self._kvs, i, self.block_ids)
            if self.mem.on_gpu:
                self.copies.append(kv.start_read(self.mem.slices(self.ios, i)))
            else:
                kv.read_chunks(self.mem.slices(self.ios, i))
        except Exception as e:  # never into vLLM's forward
            self.error = self.error or e

    def finish(self) -> None:
        """Read the layers vLLM did not report (after the forward every layer is done)."""
        for i in range(self.mem.num_layers):
            self.read_layer(i)

    # Completion
    def done(self) -> bool:
        return all(self.read) and all(c.done() for c in self.copies)

    def wait(self) -> None:
        if not all(self.read):
            raise RuntimeError("a layer-wise save was committed before every layer was read")
        for c in self.copies:
            c.wait()
        if self.error is not None:
            raise RuntimeError(f"copying a layer out of vLLM failed: {self.error}")
