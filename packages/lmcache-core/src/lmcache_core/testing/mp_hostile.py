"""Hostile clients of an lmcache server: the suite every server implementation passes.

A client that sends garbage, oversized or truncated frames, a malformed HELLO,
forged lease numbers, or keys of a namespace it did not open, must get an
error or be disconnected. The server must go on serving everyone else, never
lend a slot it was not asked for, and never give one client another's KV.

Use it as the other suites in :mod:`lmcache_core.testing`::

    class TestMyServerHostile(HostileClientTests):
        @pytest.fixture
        def server_url(self):
            ...start a server, yield "unix:///path.sock"...

The suite stores real KV through a well-behaved client (a ``CacheEngine`` on
the server) and checks it byte for byte after every attack.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from typing import Any

import pytest

from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.layout import KVLayout
from lmcache_core.mp import wire
from lmcache_core.mp.address import parse_server_url
from lmcache_core.mp.client import ServerChunkStore
from lmcache_core.mp.connection import hello_payload
from lmcache_core.mp.wire import Op, Reader, Writer
from lmcache_core.testing.paged_memory import PagedKVMemory

LAYOUT = KVLayout(
    kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
)
TOKENS = list(range(64))


def _engine(url: str, model: str = "hostile/victim") -> CacheEngine:
    cfg = CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"})

    def factory(ns: Any, metrics: Any) -> ServerChunkStore:
        return ServerChunkStore(parse_server_url(url), ns, metrics=metrics, timeout=2.0)

    return CacheEngine(cfg, model=model, layout=LAYOUT, store_factory=factory)


def _hello(**changes: Any) -> bytes:
    """A HELLO whose namespace has ``changes`` applied (layout fields or namespace fields)."""
    layout = {"kind": "vllm_flash", "dtype": "bfloat16", "num_layers": 2, "num_kv_heads": 2,
              "head_size": 8, "block_size": 4}  # fmt: skip
    ns: dict[str, Any] = {"model": "m", "chunk_size": 16, "world_size": 1, "rank": 0,
                          "hash_algorithm": "sha256", "layout": layout}  # fmt: skip
    for k, v in changes.items():
        (layout if k in layout else ns)[k] = v
    return json.dumps({"namespace": ns}).encode()


class RawClient:
    """A client that speaks the wire format by hand (to misbehave)."""

    def __init__(self, url: str) -> None:
        path = parse_server_url(url).path
        assert path is not None, "the hostile suite connects through the Unix socket"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        op, _, body = wire.read_frame(self.sock)
        assert op == Op.HELLO
        self.greeting = body

    def hello(self, payload: bytes) -> tuple[int, bytes]:
        body = Writer().u32(wire.PROTOCOL_VERSION).blob(b"").blob(payload).body()
        self.sock.sendall(wire.frame(Op.HELLO, 1, body))
        msg, fds, _, _ = socket.recv_fds(self.sock, 9, 4)
        for fd in fds:
            os.close(fd)
        length, op = int.from_bytes(msg[:4], "little"), msg[4]
        return op, wire.recv_exact(self.sock, length - 5)

    def hello_as(self, model: str) -> None:
        from lmcache_core.cache_key import KeyNamespace

        ns = KeyNamespace(model=model, layout=LAYOUT, chunk_size=16)
        op, body = self.hello(json.dumps(hello_payload(ns)).encode())
        assert op == Op.REPLY, body

    def call(self, op: int, body: bytes, seq: int = 7) -> tuple[int, bytes]:
        self.sock.sendall(wire.frame(op, seq, body))
        rop, rseq, rbody = wire.read_frame(self.sock)
        assert rseq == seq
        return rop, rbody

    def closed_by_server(self) -> bool:
        try:
            self.sock.settimeout(5)
            return self.sock.recv(1) == b""
        except (ConnectionError, OSError):
            return True

    def close(self) -> None:
        self.sock.close()


class HostileClientTests:
    """The server survives every attack and serves the well-behaved client correctly."""

    @pytest.fixture
    def server_url(self) -> str:  # pragma: no cover - supplied by the subclass
        raise NotImplementedError("a subclass provides the server_url fixture")

    @pytest.fixture
    def victim(self, server_url: str):
        """A well-behaved engine that stored ``TOKENS``; checked after each attack."""
        src = PagedKVMemory(LAYOUT, seed=11)
        table = src.table(len(TOKENS), 0)
        engine = _engine(server_url)
        assert engine.store(TOKENS, src.kv(table), cache_salt="victim") == len(TOKENS)
        yield engine, src, table
        engine.close()

    def _intact(self, victim: Any) -> None:
        engine, src, table = victim
        dst = PagedKVMemory(LAYOUT, seed=12)
        t = dst.table(len(TOKENS), 1)
        assert engine.retrieve(TOKENS, dst.kv(t), cache_salt="victim") == len(TOKENS)
        assert dst.tokens_kv(t, 0, len(TOKENS)) == src.tokens_kv(table, 0, len(TOKENS))

    # ------------------------------------------------------------------ framing

    def test_garbage_before_hello_is_dropped(self, server_url, victim):
        c = RawClient(server_url)
        c.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 10)
        assert c.closed_by_server()
        c.close()
        self._intact(victim)

    def test_an_oversized_frame_length_is_refused_unread(self, server_url, victim):
        c = RawClient(server_url)
        c.sock.sendall(struct.pack("<IBI", 0xFFFF_FFFF, Op.HELLO, 1))
        assert c.closed_by_server()
        c.close()
        self._intact(victim)

    def test_a_truncated_frame_costs_only_its_connection(self, server_url, victim):
        c = RawClient(server_url)
        c.sock.sendall(struct.pack("<IBI", 1000, Op.HELLO, 1) + b"x" * 10)
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_server()
        c.close()
        self._intact(victim)

    @pytest.mark.parametrize(
        "payload",
        [
            b"not json",
            b"[" * 60000,
            b"{" * 70000,  # longer than a HELLO may be
            json.dumps({"namespace": {"model": "m"}}).encode(),
            _hello(num_layers=10**9),
            _hello(kind="nope", rank=5, hash_algorithm="md5"),
        ],
        ids=["not-json", "deep", "too-long", "no-layout", "huge-layout", "bad-fields"],
    )
    def test_a_malformed_hello_is_refused_with_a_reason(self, server_url, victim, payload):
        c = RawClient(server_url)
        op, body = c.hello(payload)
        assert op == Op.ERROR and body
        c.close()
        self._intact(victim)

    # ------------------------------------------------------------------ requests

    def test_bad_requests_get_errors_and_the_session_goes_on(self, server_url, victim):
        c = RawClient(server_url)
        c.hello_as("hostile/attacker")
        bad = [
            (99, b""),  # unknown op
            (Op.LOOKUP, b"\x01"),  # truncated body
            (Op.LOOKUP, Writer().string("o").u8(0).u32(1 << 30).body()),  # absurd count
            (Op.LOOKUP, Writer().string("o").u8(0).u32(1).u8(0).body()),  # empty digest
            (Op.RELEASE, Writer().u64s([12345, 999]).body()),  # forged leases
            (Op.COMMIT, Writer().u64s([1]).body()),  # a lease it never got
            (Op.FETCH, Writer().u8(0).u32(1).digest(b"x" * 32).u32(9).u32(3).body()),  # bad span
            (Op.FLUSH, Writer().f64(float("nan")).body()),
            (Op.PING, b"trailing"),
        ]
        for op, body in bad:
            rop, rbody = c.call(op, body)
            assert rop == Op.ERROR, (op, rbody)
        rop, _ = c.call(Op.PING, b"")
        assert rop == Op.REPLY  # still served
        c.close()
        self._intact(victim)

    def test_a_load_lease_cannot_be_committed_and_is_released_once(self, server_url, victim):
        engine, _, _ = victim
        c = RawClient(server_url)
        c.hello_as("hostile/victim")  # the victim's own namespace: its chunks are found
        digest = engine.chunk(TOKENS, cache_salt="victim").digests[0]
        rop, body = c.call(Op.FETCH, Writer().u8(0).u32(1).digest(digest).u32(0).u32(16).body())
        assert rop == Op.REPLY
        r = Reader(body)
        assert r.count() == 1
        lease = r.u64()
        rop, _ = c.call(Op.COMMIT, Writer().u64s([lease]).body())
        assert rop == Op.ERROR  # a chunk being read is not a fresh slot
        rop, _ = c.call(Op.RELEASE, Writer().u64s([lease]).body())
        assert rop == Op.REPLY
        rop, _ = c.call(Op.RELEASE, Writer().u64s([lease]).body())
        assert rop == Op.ERROR  # released twice: refused, the slot's count untouched
        c.close()
        self._intact(victim)

    def test_another_namespace_never_reads_the_victims_chunks(self, server_url, victim):
        engine, _, _ = victim
        digests = engine.chunk(TOKENS, cache_salt="victim").digests
        c = RawClient(server_url)
        c.hello_as("hostile/attacker")  # another model: keys are formed in its namespace
        rop, body = c.call(Op.LOOKUP, Writer().string("").u8(1).digests(digests).body())
        assert rop == Op.REPLY and Reader(body).u32() == 0
        spans = Writer().u8(0).u32(len(digests))
        for i, d in enumerate(digests):
            spans.digest(d).u32(16 * i).u32(16 * i + 16)
        rop, body = c.call(Op.FETCH, spans.body())
        assert rop == Op.REPLY and Reader(body).count() == 0
        c.close()
        self._intact(victim)

    def test_a_client_that_vanishes_mid_request_leaks_no_slot(self, server_url, victim):
        engine, _, _ = victim
        before = engine.chunk_store.status()
        c = RawClient(server_url)
        c.hello_as("hostile/attacker")
        body = Writer().string("").u32(4)
        for i in range(4):
            body.digest(bytes([i]) * 32).u32(16 * i).u32(16 * i + 16)
        rop, reply = c.call(Op.ALLOCATE, body.body())
        assert rop == Op.REPLY and Reader(reply).count() == 4
        c.close()  # never commits

        def used() -> int:
            st = engine.chunk_store.status()
            return -1 if st is None else st["slots_used"]

        deadline = time.monotonic() + 10
        while used() != before["slots_used"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used() == before["slots_used"]
        self._intact(victim)
