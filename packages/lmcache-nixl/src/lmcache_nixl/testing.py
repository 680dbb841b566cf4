"""lmcache-nixl's test kit: a cache process for the p2p tier's tests, which stores
prompts, then serves them to peers until told to exit (or killed).

    python -m lmcache_nixl.testing REDIS_URL N_PROMPTS [checksums]

Its layout, config and prompts are importable, so a test reads what the peer
stored (:data:`LAYOUT`, :func:`config`, :func:`prompt`).

The p2p index refuses to start without a deployment secret, as in production:
the peer reads ``LMCACHE_AUTH_SECRET`` from its environment (the tests set
:data:`SECRET` there before starting it).

Prints READY once its chunks are stored and published. Commands on stdin:
``evict`` drops every chunk from its DRAM tier (so its index entries must go),
``reuse`` drops every chunk, stores other prompts into the freed slots and
puts the old index entries back (what a reader sees when an eviction races
its lookup), ``corrupt`` flips a byte of prompt 0's first chunk in place,
``exit`` closes cleanly.
"""

import sys

from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.testing.paged_memory import PagedKVMemory

LAYOUT = KVLayout("vllm_flash", "bfloat16", 4, 2, 64, 16)
#: The deployment secret of the tests' instances (``LMCACHE_AUTH_SECRET``): every
#: instance sharing one p2p index has the same one.
SECRET = "lmcache-nixl-test-secret-0123456789abcdef"


def config(redis_url: str, **extra) -> CacheConfig:
    return CacheConfig.from_dict(
        {
            "chunk_size": 64,
            "max_local_cpu_size": "64MiB",
            "enable_p2p": True,
            "p2p_index_url": redis_url,
            "p2p_peer_ttl": 1.0,
            "blocking_timeout_secs": 2,
            **extra,
        }
    )


def prompt(i: int, n: int = 256) -> list[int]:
    return [i * 10_000 + t for t in range(n)]


def main() -> None:
    url, n = sys.argv[1], int(sys.argv[2])
    extra = {"p2p_verify_checksums": True} if "checksums" in sys.argv[3:] else {}
    engine = CacheEngine(config(url, **extra), model="test/p2p", layout=LAYOUT)
    src = PagedKVMemory(LAYOUT, num_blocks=64, seed=7)
    for i in range(n):
        toks = prompt(i)
        engine.store(toks, src.kv(src.table(len(toks), i)))
    assert engine.flush(10)
    print("READY", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "evict":
            assert engine.cpu is not None
            while engine.cpu._evict_one():
                pass
            print("EVICTED", flush=True)
        elif cmd == "reuse":
            assert engine.cpu is not None
            p2p = engine.tiers[1].backend
            keys = [k for i in range(n) for k in engine.keys(engine.spans(prompt(i)))]
            old = [(k, e) for k, e in zip(keys, p2p.index.lookup(keys)) if e is not None]
            while engine.cpu._evict_one():
                pass
            p2p._flush_evicted()  # as the heartbeat would
            for i in range(n):  # other bytes into the freed slots
                toks = prompt(100 + i)
                engine.store(toks, src.kv(src.table(len(toks), (i + 1) % n)))
            p2p.index.publish(old)  # a reader that looked up before the eviction
            print("REUSED", flush=True)
        elif cmd == "corrupt":
            assert engine.cpu is not None
            chunk = engine.cpu._index[engine.keys(engine.spans(prompt(0)))[0]]
            chunk.view[100] ^= 0xFF
            print("CORRUPTED", flush=True)
        elif cmd == "exit":
            break
    engine.close()


if __name__ == "__main__":
    main()
