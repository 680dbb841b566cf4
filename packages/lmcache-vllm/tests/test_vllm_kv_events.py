"""KV cache events in a real vLLM server, read as a cache-aware router reads them.

vLLM publishes over ZMQ (``--kv-events-config``); the subscriber here decodes
the batches with vLLM's own types, as llm-d's KV-cache manager does. lmcache's
``CPU`` events must name the very block hashes vLLM's own ``GPU`` events name
(so a router hashing a prompt the vLLM way finds the instance), and an
evicted chunk must come back as ``BlockRemoved``.
"""

from __future__ import annotations

import json
import os
import time

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

from lmcache_core.testing.servers import free_port  # noqa: E402


class Router:
    """A router's subscriber: every event published so far, by medium."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.connect(endpoint)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.events: list = []

    def drain(self, seconds: float) -> None:
        import msgspec
        import zmq
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000), zmq.POLLIN):
                _topic, _seq, payload = self.sock.recv_multipart()
                self.events.extend(decoder.decode(payload).events)

    def stored(self, medium: str) -> list:
        return [e for e in self.events if type(e).__name__ == "BlockStored" and e.medium == medium]

    def removed(self, medium: str) -> set:
        return {
            h
            for e in self.events
            if type(e).__name__ == "BlockRemoved" and e.medium == medium
            for h in e.block_hashes
        }

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def test_a_router_sees_lmcache_blocks_under_vllms_hashes_and_their_eviction(tiny_model, tmp_path):
    from lmcache_vllm.testing import complete, vllm_server

    port = free_port()
    events_cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}"}
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        # Twelve 512 KiB chunks of the tiny model (2 KiB per token): the second
        # prompt evicts the first's.
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "6MiB",
        "LMCACHE_SOCKET_DIR": str(tmp_path),
    }
    args = ["--enable-prefix-caching", "--kv-events-config", json.dumps(events_cfg)]
    router = Router(f"tcp://127.0.0.1:{port}")
    try:
        with vllm_server(tiny_model, "kv_both", env, tmp_path / "vllm.log", args=args) as api:
            time.sleep(1)  # ZMQ's slow joiner: the subscription reaches the publisher
            first = " ".join(f"alpha{i}" for i in range(260))
            complete(api, first, max_tokens=2)
            router.drain(3)
            gpu = router.stored("GPU")
            cpu = router.stored("CPU")
            assert gpu and cpu, [
                type(e).__name__ + str(getattr(e, "medium", "")) for e in router.events
            ]
            gpu_chain = [h for e in gpu for h in e.block_hashes]
            cpu_chain = [h for e in cpu for h in e.block_hashes]
            # lmcache's chunks are whole vLLM blocks, named as vLLM names them, in order.
            assert len(cpu_chain) >= 4 and cpu_chain == gpu_chain[: len(cpu_chain)]
            tokens = {  # each GPU block's tokens
                h: e.token_ids[j * e.block_size : (j + 1) * e.block_size]
                for e in gpu
                for j, h in enumerate(e.block_hashes)
            }
            for e in cpu:
                assert e.token_ids == [t for h in e.block_hashes for t in tokens[h]]
                assert e.parent_block_hash in (None, *gpu_chain)
            assert not router.removed("CPU")
            # A second prompt that does not fit beside the first evicts its chunks.
            second = " ".join(f"beta{i}" for i in range(300))
            complete(api, second, max_tokens=2)
            complete(api, "gamma " * 20, max_tokens=2)  # one more step carries the events
            router.drain(3)
            gone = router.removed("CPU")
            assert gone and gone <= set(cpu_chain)
    finally:
        router.close()
