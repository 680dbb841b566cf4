"""A cache process for the p2p tests: stores prompts, then serves them to peers until killed.

    python p2p_peer.py REDIS_URL N_PROMPTS

Prints READY once its chunks are stored and published. Commands on stdin:
``evict`` drops every chunk from its DRAM tier (so its index entries must go),
``exit`` closes cleanly.
"""

import sys

from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.testing.paged_memory import PagedKVMemory

LAYOUT = KVLayout("vllm_flash", "bfloat16", 4, 2, 64, 16)


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
    engine = CacheEngine(config(url), model="test/p2p", layout=LAYOUT)
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
        elif cmd == "exit":
            break
    engine.close()


if __name__ == "__main__":
    main()
