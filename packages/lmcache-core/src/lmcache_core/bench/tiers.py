"""The tier benchmark: disk and Redis tiers against the raw I/O of the same bytes.

Run it as ``lmcache bench tiers`` or ``python tools/bench_tiers.py``. Each
figure is a ratio measured in one process, rounds interleaved (raw, tier, raw,
tier...), median of the rounds, because these machines drift in speed.

* disk: N chunk-sized values. Raw: the same bytes written to one file
  sequentially, a ``write`` per value, and read back with ``preadv`` into
  preallocated buffers: the physical baseline of the disk. Writes are timed
  until the bytes are on the disk (``sync``), on both sides. Tier:
  :class:`~lmcache_core.backends.disk.LocalDiskBackend` ``put``/``get`` (header,
  checksum, atomic rename; checksum verified on read). Before each read pass
  both sets of files are flushed and dropped from the page cache
  (``fsync`` + ``POSIX_FADV_DONTNEED``), so reads come from the disk.
* redis: the same values. Raw: redis-py pipelined ``SET`` and ``GET``.
  Tier: :class:`~lmcache_core.backends.redis.RedisBackend` ``put``/``get``
  (framing, checksum, ``SET NX`` pipeline, bounded ``GETRANGE`` reads, decode
  into pool slots); ``redis+auth`` the same with a deployment secret (a
  Poly1305 MAC over every frame instead of the xxh3), ``redis+encrypt`` with
  AES-256-GCM. Authentication's cost is ``redis+auth`` against ``redis``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmcache_core.keys import CacheKey
from lmcache_core.pool import Chunk, SlotPool


@dataclass
class TierBenchResult:
    chunk_bytes: int
    chunks: int
    #: (tier, op) -> (raw seconds, tier seconds), medians over rounds
    times: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    correct: bool = True

    def ratio(self, tier: str, op: str) -> float:
        raw, ours = self.times[(tier, op)]
        return raw / ours

    def gbps(self, seconds: float) -> float:
        return self.chunk_bytes * self.chunks / seconds / 1e9


def _keys(n: int) -> list[CacheKey]:
    return [CacheKey.of(b"bench-tier-ns-16", i.to_bytes(32, "little")) for i in range(n)]


def _make_chunks(pool: SlotPool, keys: list[CacheKey], nbytes: int) -> list[Chunk]:
    rng = np.random.default_rng(0)
    out = []
    for k in keys:
        c = pool.allocate(k, 256, nbytes)
        assert c is not None
        np.frombuffer(c.view, dtype=np.uint8)[:] = rng.integers(1, 256, nbytes, dtype=np.uint8)
        out.append(c)
    return out


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_disk(
    result: TierBenchResult, chunks: list[Chunk], pool: SlotPool, root: Path, rounds: int
) -> None:
    from lmcache_core.backends.disk import LocalDiskBackend

    nbytes = result.chunk_bytes
    batch = 8  # chunks per call, as the engine stores and retrieves a prompt's chunks
    raw_dir = root / "raw"
    raw_bufs = [bytearray(nbytes) for _ in range(4)]
    w_raw, w_tier, r_raw, r_tier = [], [], [], []

    def one_round(r: int) -> None:
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir(parents=True)
        os.sync()  # each timed phase starts with no dirty pages from the last
        tier_dir = root / f"tier{r}"
        disk = LocalDiskBackend(tier_dir, 1 << 62)
        raw_path = raw_dir / "sequential.bin"

        def raw_write() -> None:
            fd = os.open(raw_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                for c in chunks:
                    os.write(fd, c.view)
            finally:
                os.close(fd)

        def tier_write() -> None:
            for s in range(0, len(chunks), batch):
                disk.put(chunks[s : s + batch])

        for fn, out in ((raw_write, w_raw), (tier_write, w_tier))[:: -1 if r % 2 else 1]:
            # Timed until the bytes are on the disk: page-cache speed is not disk speed.
            out.append(_timed(lambda fn=fn: (fn(), os.sync())))
        tier_paths = [disk._path(c.key) for c in chunks]
        _drop_cache([raw_path, *tier_paths])

        def raw_read() -> None:
            fd = os.open(raw_path, os.O_RDONLY)
            try:
                for i in range(len(chunks)):
                    os.preadv(fd, [raw_bufs[i % 4]], i * nbytes)
            finally:
                os.close(fd)

        got: list[Chunk | None] = []

        def tier_read() -> None:
            for s in range(0, len(chunks), batch):
                part = chunks[s : s + batch]
                for c, g in zip(part, disk.get([c.key for c in part], pool.allocate)):
                    got.append(g)
                    if g is not None:
                        if len(got) == 1:
                            result.correct &= bytes(g.view) == bytes(c.view)
                        g.release()

        for fn, out in ((raw_read, r_raw), (tier_read, r_tier))[:: -1 if r % 2 else 1]:
            out.append(_timed(fn))
        result.correct &= all(g is not None for g in got)
        disk.close()
        shutil.rmtree(tier_dir, ignore_errors=True)

    for r in range(rounds):
        one_round(r)
    shutil.rmtree(raw_dir, ignore_errors=True)
    result.times[("disk", "write")] = (statistics.median(w_raw), statistics.median(w_tier))
    result.times[("disk", "read")] = (statistics.median(r_raw), statistics.median(r_tier))


def bench_redis(
    result: TierBenchResult,
    chunks: list[Chunk],
    pool: SlotPool,
    url: str,
    rounds: int,
    *,
    authenticated: bool = True,
) -> None:
    """Raw redis-py against the tier, and (``authenticated``) the tier with a
    deployment secret (MAC) and with encryption, all interleaved in each round."""
    import redis

    from lmcache_core.auth import FrameSealer
    from lmcache_core.backends.redis import RedisBackend

    client = redis.Redis.from_url(url)
    secret = b"bench-secret-0123456789abcdef!!"
    variants: dict[str, FrameSealer | None] = {"redis": None}
    if authenticated:
        variants["redis+auth"] = FrameSealer(secret)
        variants["redis+encrypt"] = FrameSealer(secret, encrypt=True)
    times: dict[tuple[str, str], list[float]] = {}
    raw_w: list[float] = []
    raw_r: list[float] = []
    batch = 8

    def one_round(r: int) -> None:
        client.flushdb()
        raw_names = [f"raw{r}:{i}" for i in range(len(chunks))]
        tiers = {
            name: RedisBackend(url, key_prefix=f"bench{r}-{name}:", sealer=sealer)
            for name, sealer in variants.items()
        }

        def raw_set() -> None:
            for s in range(0, len(chunks), batch):
                pipe = client.pipeline(transaction=False)
                for name, c in zip(raw_names[s : s + batch], chunks[s : s + batch]):
                    pipe.set(name, c.view)
                pipe.execute()

        def raw_get() -> None:
            for s in range(0, len(chunks), batch):
                pipe = client.pipeline(transaction=False)
                for name in raw_names[s : s + batch]:
                    pipe.get(name)
                pipe.execute()

        def put(tier: RedisBackend) -> None:
            for s in range(0, len(chunks), batch):
                tier.put(chunks[s : s + batch])

        def get(tier: RedisBackend) -> None:
            for s in range(0, len(chunks), batch):
                for g in tier.get([c.key for c in chunks[s : s + batch]], pool.allocate):
                    if g is None:
                        result.correct = False
                    else:
                        g.release()

        order = list(tiers.items())
        if r % 2:
            order.reverse()
        raw_w.append(_timed(raw_set))
        for name, tier in order:
            times.setdefault((name, "write"), []).append(_timed(lambda t=tier: put(t)))
        raw_r.append(_timed(raw_get))
        for name, tier in order:
            times.setdefault((name, "read"), []).append(_timed(lambda t=tier: get(t)))
        for tier in tiers.values():
            (g,) = tier.get([chunks[0].key], pool.allocate)
            result.correct &= g is not None and bytes(g.view) == bytes(chunks[0].view)
            if g is not None:
                g.release()
            tier.close()

    for r in range(rounds):
        one_round(r)
    client.flushdb()
    for (name, op), ts in times.items():
        raw = statistics.median(raw_w if op == "write" else raw_r)
        result.times[(name, op)] = (raw, statistics.median(ts))


def run_tier_benchmark(
    *,
    chunk_mib: float = 8.0,
    chunks: int = 32,
    rounds: int = 3,
    disk_dir: str | None = None,
    redis_url: str | None = None,
    tiers: tuple[str, ...] = ("disk", "redis"),
    on_step: Callable[[str], None] | None = None,
) -> TierBenchResult:
    """Run the benchmark; ``redis_url=None`` starts a private redis-server for it."""
    nbytes = int(chunk_mib * (1 << 20))
    pool = SlotPool.anonymous(nbytes * (chunks + 16), nbytes)
    data = _make_chunks(pool, _keys(chunks), nbytes)
    result = TierBenchResult(nbytes, chunks)
    try:
        if "disk" in tiers:
            root = Path(tempfile.mkdtemp(prefix="lmcache-bench-", dir=disk_dir))
            try:
                bench_disk(result, data, pool, root, rounds)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            if on_step:
                on_step("disk")
        if "redis" in tiers:
            if redis_url is None:
                from lmcache_core.testing.servers import RedisServer

                with RedisServer() as server:
                    bench_redis(result, data, pool, server.url, rounds)
            else:
                bench_redis(result, data, pool, redis_url, rounds)
            if on_step:
                on_step("redis")
    finally:
        for c in data:
            c.release()
    return result
