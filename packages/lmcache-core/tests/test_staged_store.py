"""Stores whose copy is still in flight: staged, then committed when the copy is done.

The asynchronous reader here is a test double of a GPU reader: it copies at
``start_read`` time into its own staging and only delivers the bytes (and
reports done) when the test says the "stream" has reached them, so the
tests can look at the cache in between. The real GPU reader is tested in
lmcache-cuda (marked ``gpu``).
"""

from __future__ import annotations

import pytest
from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.staged_store import SaveQueue
from lmcache_core.testing.paged_memory import PagedKVMemory
from lmcache_core.transfer import AsyncKVReader, ChunkIO

LAYOUT = KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 4)


class FakeStream:
    """Work queued on a device, run when the test says so."""

    def __init__(self) -> None:
        self.queued: list = []

    def run_all(self) -> None:
        while self.queued:
            self.queued.pop(0)()


class FakeCompletion:
    def __init__(self, stream: FakeStream, fail: bool = False) -> None:
        self.stream, self.fail, self.finished, self.waited = stream, fail, False, 0
        stream.queued.append(self._finish)

    def _finish(self) -> None:
        self.finished = True

    def done(self) -> bool:
        return self.finished

    def wait(self) -> None:
        self.waited += 1
        self.stream.run_all()
        if self.fail:
            raise RuntimeError("an illegal memory access was encountered")


class AsyncReader:
    """Reads like a GPU reader: the bytes land when the stream runs."""

    def __init__(self, inner, stream: FakeStream, fail: bool = False) -> None:
        self.inner, self.stream, self.fail = inner, stream, fail
        self.completions: list[FakeCompletion] = []

    def read_chunks(self, chunks) -> None:
        raise AssertionError("an asynchronous store must not read synchronously")

    def start_read(self, chunks) -> FakeCompletion:
        def land() -> None:
            self.inner.read_chunks(chunks)

        self.stream.queued.append(land)
        c = FakeCompletion(self.stream, self.fail)
        self.completions.append(c)
        return c


def make_engine() -> CacheEngine:
    config = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})
    return CacheEngine(config, model="test/model", layout=LAYOUT)


def test_a_staged_store_is_invisible_until_its_copy_is_done_then_committed():
    src, dst = PagedKVMemory(LAYOUT, seed=1), PagedKVMemory(LAYOUT, seed=2)
    tokens = list(range(100, 164))
    stream = FakeStream()
    reader = AsyncReader(src.kv(src.table(64, 0)), stream)
    assert isinstance(reader, AsyncKVReader)
    with make_engine() as engine:
        free = engine.pool.free_slots
        queue = SaveQueue(engine)
        staged = engine.store_async(tokens, reader)
        assert staged is not None and staged.num_tokens == 64
        queue.add("req-1", staged)
        assert engine.pool.free_slots == free - 4  # slots held by the copy
        assert queue.poll() == 0 and len(queue) == 1  # not done: nothing committed
        assert engine.lookup(tokens) == 0  # no lookup sees half-written bytes
        stream.run_all()  # the device reaches the copy
        assert queue.poll() == 64 and len(queue) == 0
        assert engine.lookup(tokens) == 64
        t_dst = dst.table(64, 5)
        assert engine.retrieve(tokens, dst.kv(t_dst)) == 64
        assert dst.tokens_kv(t_dst, 0, 64) == src.tokens_kv(src.table(64, 0), 0, 64)
        assert engine.metrics.get("lmcache:num_stored_tokens") == 64


def test_a_failed_copy_stores_nothing_and_frees_its_slots():
    src = PagedKVMemory(LAYOUT, seed=1)
    tokens = list(range(64))
    stream = FakeStream()
    with make_engine() as engine:
        free = engine.pool.free_slots
        staged = engine.store_async(tokens, AsyncReader(src.kv(src.table(64, 0)), stream, True))
        assert staged is not None
        assert engine.finish_store(staged) == 0
        assert engine.pool.free_slots == free
        assert engine.lookup(tokens) == 0
        assert engine.metrics.get("lmcache:num_failures", op="read_kv") == 1
        assert engine.finish_store(staged) == 0  # committing twice is harmless


def test_the_queue_bounds_copies_in_flight_and_drains_at_shutdown():
    src = PagedKVMemory(LAYOUT, seed=3)
    stream = FakeStream()
    with make_engine() as engine:
        queue = SaveQueue(engine, max_in_flight=2)
        readers = []
        for i in range(3):
            r = AsyncReader(src.kv(src.table(32, i)), stream)
            readers.append(r)
            staged = engine.store_async(list(range(1000 * i, 1000 * i + 32)), r)
            assert staged is not None
            queue.add(f"req-{i}", staged)
        # The third add waited for the oldest copy (and the stream ran everything).
        assert readers[0].completions[0].waited == 1
        assert len(queue) == 2
        assert queue.drain() == 64 and len(queue) == 0
        for i in range(3):
            assert engine.lookup(list(range(1000 * i, 1000 * i + 32))) == 32


def test_a_synchronous_reader_is_committed_at_the_first_poll():
    src = PagedKVMemory(LAYOUT, seed=4)
    tokens = list(range(48))
    with make_engine() as engine:
        committed = []
        queue = SaveQueue(engine, on_commit=lambda owner, s, n: committed.append((owner, n)))
        staged = engine.store_async(tokens, src.kv(src.table(48, 0)))  # numpy: no start_read
        assert staged is not None and staged.done()
        queue.add("r", staged)
        assert queue.poll() == 48
        assert committed == [("r", 48)]
        assert engine.store_async(tokens, src.kv(src.table(48, 0))) is None  # all present


def test_the_copy_is_started_with_the_chunk_buffers_it_will_fill():
    """The reader gets one ChunkIO per chunk to store, in token order."""
    src = PagedKVMemory(LAYOUT, seed=5)
    seen: list[ChunkIO] = []

    class Recorder(AsyncReader):
        def start_read(self, chunks):
            seen.extend(chunks)
            return super().start_read(chunks)

    with make_engine() as engine:
        staged = engine.store_async(
            list(range(40)), Recorder(src.kv(src.table(40, 0)), FakeStream())
        )
        assert [(c.start, c.end) for c in seen] == [(0, 16), (16, 32), (32, 40)]
        assert all(c.buffer.nbytes == LAYOUT.chunk_bytes(c.end - c.start) for c in seen)
        assert engine.finish_store(staged) == 40


@pytest.mark.parametrize("fail", [False, True])
def test_time_to_store_is_observed_once_per_store(fail):
    src = PagedKVMemory(LAYOUT, seed=6)
    with make_engine() as engine:
        staged = engine.store_async(
            list(range(32)), AsyncReader(src.kv(src.table(32, 0)), FakeStream(), fail)
        )
        engine.finish_store(staged)
        count = sum(
            v[2]  # (bucket counts, sum, count)
            for name, _, values in engine.metrics.samples()
            if name == "lmcache:time_to_store"
            for v in values.values()
        )
        assert count == 1


class DeferredWriter:
    """Writes like a layer-wise writer: later, when the test says so."""

    def __init__(self, inner) -> None:
        self.inner, self.ios = inner, []
        self.completion = Switch()

    def write_chunks(self, chunks) -> None:
        raise AssertionError("an asynchronous load must not write synchronously")

    def start_write(self, chunks):
        self.ios = list(chunks)
        return self.completion

    def run(self) -> None:
        self.inner.write_chunks(self.ios)
        self.completion.on = True


class Switch:
    def __init__(self) -> None:
        self.on = False

    def done(self) -> bool:
        return self.on

    def wait(self) -> None:
        assert self.on, "released before the copy ran"


def test_an_asynchronous_load_holds_its_chunks_until_released():
    src, dst = PagedKVMemory(LAYOUT, seed=7), PagedKVMemory(LAYOUT, seed=8)
    tokens = list(range(300, 348))
    with make_engine() as engine:
        t_src, t_dst = src.table(48, 0), dst.table(48, 3)
        assert engine.store(tokens, src.kv(t_src)) == 48
        free = engine.pool.free_slots
        writer = DeferredWriter(dst.kv(t_dst))
        end, staged = engine.retrieve_async(tokens, writer, write_from=16)
        assert end == 48 and staged is not None and not staged.done()
        assert [(io.start, io.write_range) for io in writer.ios] == [
            (16, (16, 32)),
            (32, (32, 48)),
        ]  # the chunk before write_from is already in engine memory
        writer.run()  # the adapter's copies, layer by layer
        assert staged.done()
        staged.release()
        staged.release()  # once only
        assert engine.pool.free_slots == free
        assert dst.tokens_kv(t_dst, 16, 48) == src.tokens_kv(t_src, 16, 48)
        assert engine.retrieve_async(list(range(9000, 9048)), writer) == (0, None)


def test_two_stores_of_one_prefix_in_flight_store_it_once():
    """Two requests with the same prefix a step apart: both copies start before either
    is committed; the chunks are stored (and counted) once."""
    src = PagedKVMemory(LAYOUT, seed=9)
    tokens = list(range(500, 548))
    stream = FakeStream()
    with make_engine() as engine:
        free = engine.pool.free_slots
        first = engine.store_async(tokens, AsyncReader(src.kv(src.table(48, 0)), stream))
        second = engine.store_async(tokens, AsyncReader(src.kv(src.table(48, 1)), stream))
        assert first is not None and second is not None  # neither was in a tier yet
        stream.run_all()
        assert engine.finish_store(first) == 48
        assert engine.finish_store(second) == 0
        assert engine.metrics.get("lmcache:num_stored_tokens") == 48
        assert engine.pool.free_slots == free - 3  # one copy kept, the other freed
