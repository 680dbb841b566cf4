"""The adapter's parts without an engine: layout detection, lookup transport, settings."""

from __future__ import annotations

import os
import pickle

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")

from lmcache_core.config import CacheConfig  # noqa: E402
from lmcache_core.errors import ConfigError, LayoutError  # noqa: E402
from lmcache_core.layout import LayoutKind  # noqa: E402
from lmcache_vllm.layouts import detect_layout, ordered_layers  # noqa: E402
from lmcache_vllm.lookup import LookupClient, LookupServer, socket_path  # noqa: E402
from lmcache_vllm.metadata import LMCacheConnectorMetadata, LoadSpec, PromptRef  # noqa: E402
from lmcache_vllm.settings import check_chunk_size, load_cache_config  # noqa: E402


def test_detect_layout_recognises_vllm_shapes_and_orders_layers():
    cpu = {
        f"model.layers.{i}.self_attn.attn": torch.zeros(8, 2, 128, 128, dtype=torch.bfloat16)
        for i in (10, 2, 1)
    }
    lay = detect_layout(cpu, block_size=128, num_kv_heads=2, head_size=64)
    assert (lay.kind, lay.num_layers, lay.dtype) == (LayoutKind.VLLM_CPU, 3, "bfloat16")
    assert [n for n, _ in ordered_layers(cpu)] == [
        "model.layers.1.self_attn.attn",
        "model.layers.2.self_attn.attn",
        "model.layers.10.self_attn.attn",
    ]
    flash = {"l.0": torch.zeros(2, 8, 16, 4, 64, dtype=torch.float16)}
    assert detect_layout(flash, block_size=16, num_kv_heads=4, head_size=64).kind is (
        LayoutKind.VLLM_FLASH
    )
    first = {"l.0": torch.zeros(8, 2, 16, 4, 64, dtype=torch.float16)}
    assert detect_layout(first, block_size=16, num_kv_heads=4, head_size=64).kind is (
        LayoutKind.VLLM_FLASH_BLOCKS_FIRST
    )
    with pytest.raises(LayoutError, match="unsupported vLLM KV cache shape"):
        detect_layout({"l.0": torch.zeros(3, 3)}, block_size=16, num_kv_heads=4, head_size=64)
    mixed = {"l.0": torch.zeros(8, 2, 128, 128), "l.1": torch.zeros(8, 2, 128, 64)}
    with pytest.raises(LayoutError, match="hybrid"):
        detect_layout(mixed, block_size=128, num_kv_heads=2, head_size=64)


def test_chunk_size_must_be_a_multiple_of_the_block_size():
    check_chunk_size(CacheConfig.from_dict({"chunk_size": 256}), 128)
    with pytest.raises(ConfigError, match="LMCACHE_CHUNK_SIZE=128"):
        check_chunk_size(CacheConfig.from_dict({"chunk_size": 100}), 128)


def test_extra_config_overrides_and_is_validated(monkeypatch):
    monkeypatch.setenv("LMCACHE_CHUNK_SIZE", "512")
    assert load_cache_config({"chunk_size": 128, "model_id": "x"}).chunk_size == 128
    assert load_cache_config(None).chunk_size == 512
    with pytest.raises(ConfigError, match="chunk_sise"):
        load_cache_config({"chunk_sise": 1})


def test_metadata_survives_pickling():
    meta = LMCacheConnectorMetadata(
        loads=[LoadSpec("r", PromptRef(256, 300, [b"a" * 32, b"b" * 32]), [1, 2, 3], 0, 256)]
    )
    back = pickle.loads(pickle.dumps(meta))
    assert back.loads[0].prompt.prompt().end(1) == 300


_SERVER = """
import sys, time
from lmcache_vllm.lookup import LookupServer
engine_id, rank, held = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
server = LookupServer(
    engine_id,
    rank,
    lambda cs, n, d, o: min(held, len(d)),
    lambda o: None,
    lambda cs, chains, o: [min(held + i, len(c)) for i, c in enumerate(chains)],
    sources=lambda o: ["host"] * (held - 1) + ["disk" if rank == 0 else "remote"],
)
print("ready", flush=True)
sys.stdin.read()
server.close()
"""


def test_lookup_over_sockets_takes_the_minimum_over_ranks(tmp_path, monkeypatch):
    """Two worker processes hold 3 and 5 chunks; the scheduler may count 3."""
    import subprocess
    import sys

    monkeypatch.setenv("LMCACHE_SOCKET_DIR", str(tmp_path))
    engine_id = f"test-{os.getpid()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SERVER, engine_id, str(rank), str(held)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ},
        )
        for rank, held in ((0, 3), (1, 5))
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        client = LookupClient(engine_id, 2, timeout_s=5)
        digests = [bytes([i]) * 32 for i in range(8)]
        assert client.lookup(256, 2048, digests, "req-1") == 3
        assert client.lookup(256, 2048, digests[:2], "req-2") == 2
        # Blend segments: each chain's count is the minimum over the ranks, in one round trip.
        chains = [digests[:8], digests[:1], [], digests[:7]]
        assert client.lookup_chains(256, chains, "req-4") == [3, 1, 0, 6]
        # Where each rank found the chunks of an owner's last lookup.
        assert client.sources("req-1") == [
            ["host", "host", "disk"],
            ["host"] * 4 + ["remote"],
        ]
        client.unpin("req-1")
        # A rank that dies counts as a miss, never as an error.
        procs[1].kill()
        procs[1].wait()
        assert client.lookup(256, 2048, digests, "req-3") == 0
        assert client.lookup_chains(256, chains, "req-5") == [0, 0, 0, 0]
        assert client.sources("req-5")[1] == [], "a dead rank cannot say"
        client.close()
    finally:
        for p in procs:
            if p.poll() is None:
                p.communicate("", timeout=10)


def test_lookup_socket_refuses_garbage(tmp_path, monkeypatch):
    import socket

    monkeypatch.setenv("LMCACHE_SOCKET_DIR", str(tmp_path))
    server = LookupServer("garbage", 0, lambda *a: 1, lambda o: None)
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(socket_path("garbage", 0))
        s.sendall(b"\x05\x00\x00\x00\x01hello")  # a lookup frame with a nonsense payload
        assert s.recv(4) == b""  # the server drops the connection instead of answering
        s.close()
        assert LookupClient("garbage", 1, 5).lookup(256, 256, [b"x" * 32], "o") == 1
    finally:
        server.close()
    assert not os.path.exists(socket_path("garbage", 0))


def test_deep_socket_dirs_fall_back_to_a_short_deterministic_path(tmp_path, monkeypatch):
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    monkeypatch.setenv("LMCACHE_SOCKET_DIR", str(deep))
    path = socket_path("e" * 36, 3)
    assert len(path) <= 100 and path == socket_path("e" * 36, 3)
    server = LookupServer("e" * 36, 3, lambda *a: 2, lambda o: None)
    try:
        # Force the socket path (no in-process shortcut) by asking as another engine id alias.
        from lmcache_vllm import lookup

        local = lookup._LOCAL.pop(("e" * 36, 3))
        try:
            assert LookupClient("e" * 36, 4, 5)._call(3, 3, b"") == 0  # ping over the socket
        finally:
            lookup._LOCAL[("e" * 36, 3)] = local
    finally:
        server.close()


def _scheduler(engine_id: str):
    from types import SimpleNamespace

    from lmcache_vllm.connector import SchedulerSide

    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={}, kv_role="kv_both", engine_id=engine_id
        ),
        cache_config=SimpleNamespace(block_size=16),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
    )
    return SchedulerSide(cfg, None)


def test_scheduler_plans_loads_for_new_and_resumed_requests_and_saves_as_it_goes():
    """vLLM's scheduler output is a stand-in here; the real-engine tests cover the rest."""
    from types import SimpleNamespace

    from lmcache_vllm import lookup

    lookup._LOCAL[("sched-test", 0)] = (lambda cs, n, d, o: len(d), lambda o: None)
    try:
        side = _scheduler("sched-test")
        req = SimpleNamespace(request_id="r", prompt_token_ids=list(range(600)), cache_salt=None)
        # 2 full chunks + a partial cut to whole blocks (80 tokens) = 592, below 600 - 1.
        assert side.get_num_new_matched_tokens(req, 0) == 592
        assert side.get_num_new_matched_tokens(req, 512) == 80
        side.update_state_after_alloc(req, None, 80)
        none = SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        )
        new = SimpleNamespace(req_id="r", block_ids=(list(range(10, 48)),), num_computed_tokens=592)
        meta = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[new], scheduled_cached_reqs=none, num_scheduled_tokens={"r": 8}
            )
        )
        (load,) = meta.loads
        assert (load.load_from, load.load_until, load.block_ids[:2]) == (512, 592, [10, 11])
        assert len(meta.saves) == 1 and meta.saves[0].prompt.num_tokens == 592
        # Preempted, then resumed: it looks up again and comes back as a cached request.
        assert side.get_num_new_matched_tokens(req, 0) == 592
        side.update_state_after_alloc(req, None, 592)
        resumed = SimpleNamespace(
            req_ids=["r"],
            resumed_req_ids={"r"},
            new_block_ids=[(list(range(100, 138)),)],
            num_computed_tokens=[592],
        )
        meta = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[], scheduled_cached_reqs=resumed, num_scheduled_tokens={"r": 8}
            )
        )
        (load,) = meta.loads
        assert (load.load_from, load.load_until) == (0, 592)
        assert load.block_ids[:2] == [100, 101], "a resumed request loads into its new blocks"
        assert meta.saves == []  # its chunks were planned for saving already
        side.request_finished(req)
        assert "r" not in side.requests
    finally:
        lookup._LOCAL.pop(("sched-test", 0), None)


def test_a_chats_next_round_loads_the_last_rounds_stored_tail_too():
    """Round 2 repeats round 1's prompt and goes on: its chunk past the shared full
    chunks misses, but round 1's trailing partial chunk (whole blocks) is found."""
    from types import SimpleNamespace

    from lmcache_core.keys import TokenChunker
    from lmcache_vllm import lookup

    chunker = TokenChunker(256, "sha256")
    round1 = list(range(1000, 1000 + 560))  # 2 full chunks + 48 tokens: a 48-token tail
    stored = set(chunker.chunk(round1, partial_multiple=16).digests)
    calls = []

    def leading(chain):
        n = 0
        while n < len(chain) and chain[n] in stored:
            n += 1
        return n

    def prompts(cs, chains, owner):
        calls.append(len(chains))
        return [leading(c) for c in chains]

    lookup._LOCAL[("tail-test", 0)] = (
        lambda cs, n, d, o: leading(d), lambda o: None, lookup._no_chains, prompts
    )  # fmt: skip
    try:
        side = _scheduler("tail-test")
        req = SimpleNamespace(
            request_id="r2", prompt_token_ids=round1 + list(range(7, 307)), cache_salt=None
        )
        # 512 from the full chunks, then round 1's 48-token tail: 560 (round 2 has 860).
        assert side.get_num_new_matched_tokens(req, 0) == 560
        assert calls == [16], "the head and every whole-block tail (16..240), in one call"
        side.update_state_after_alloc(req, None, 560)
        none = SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        )
        new = SimpleNamespace(req_id="r2", block_ids=(list(range(1, 61)),), num_computed_tokens=560)
        meta = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[new], scheduled_cached_reqs=none, num_scheduled_tokens={"r2": 8}
            )
        )
        (load,) = meta.loads
        assert (load.load_from, load.load_until, load.prompt.num_tokens) == (0, 560, 560)
        assert load.found_past_own_keys == 48, "the workers count the tail as lookup hits"
        assert load.prompt.digests == chunker.chunk(round1, partial_multiple=16).digests
        # Another third chunk, no stored tail: only the full chunks load, nothing guessed.
        other = SimpleNamespace(
            request_id="r3", prompt_token_ids=round1[:512] + list(range(9, 400)), cache_salt=None
        )
        assert side.get_num_new_matched_tokens(other, 0) == 512
        # A salted (other tenant's) round 2 finds neither: the tail keys carry the salt.
        salted = SimpleNamespace(
            request_id="r4", prompt_token_ids=req.prompt_token_ids, cache_salt="tenant-b"
        )
        assert side.get_num_new_matched_tokens(salted, 0) == 0
    finally:
        lookup._LOCAL.pop(("tail-test", 0), None)


def test_saves_carry_the_block_prefix_keys_later_prompts_find_inside_a_chunk():
    """A prompt sharing only a stored chunk's first blocks loads them (the workers register
    the save's inner-prefix keys as aliases: lmcache_core.chunk_aliases, tested there)."""
    from types import SimpleNamespace

    from lmcache_core.keys import TokenChunker
    from lmcache_vllm import lookup

    chunker = TokenChunker(256, "sha256")
    stored: set[bytes] = set()

    def leading(chain):
        n = 0
        while n < len(chain) and chain[n] in stored:
            n += 1
        return n

    lookup._LOCAL[("inner-test", 0)] = (
        lambda cs, n, d, o: leading(d), lambda o: None, lookup._no_chains,
        lambda cs, chains, o: [leading(c) for c in chains],
    )  # fmt: skip
    none = SimpleNamespace(
        req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
    )
    try:
        side = _scheduler("inner-test")
        a = list(range(5000, 5600))  # 2 full chunks and an 88-token tail (80 stored)
        req = SimpleNamespace(request_id="a", prompt_token_ids=a, cache_salt="t")
        assert side.get_num_new_matched_tokens(req, 0) == 0
        side.update_state_after_alloc(req, None, 0)
        new = SimpleNamespace(req_id="a", block_ids=(list(range(1, 39)),), num_computed_tokens=0)
        meta = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[new],
                scheduled_cached_reqs=none,
                num_scheduled_tokens={"a": 600},
            )
        )
        (save,) = meta.saves
        assert save.inner_step == 16 and sorted(save.inner) == [0, 1, 2]
        assert [len(save.inner[i]) for i in (0, 1, 2)] == [15, 15, 4]  # 16..240, 16..64
        for i, digests in save.inner.items():
            lengths = [16 * (k + 1) for k in range(len(digests))]
            assert digests == chunker.continuations(a, i, lengths, cache_salt="t")
        stored.update(save.prompt.digests)
        for digests in save.inner.values():  # what the workers' aliases answer
            stored.update(digests)
        # Shares chunk 0 and 44 tokens of chunk 1: loads 256 + 32 (two whole blocks).
        b = SimpleNamespace(request_id="b", prompt_token_ids=a[:300] + [7] * 300, cache_salt="t")
        assert side.get_num_new_matched_tokens(b, 0) == 288
        side.update_state_after_alloc(b, None, 288)
        new_b = SimpleNamespace(
            req_id="b", block_ids=(list(range(1, 39)),), num_computed_tokens=288
        )
        meta = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[new_b],
                scheduled_cached_reqs=none,
                num_scheduled_tokens={"b": 8},
            )
        )
        (load,) = meta.loads
        # The load reads chunk 0 (its keys were sent with a's save: not hashed again) and
        # the 32-token partial chunk, whose first block's key the workers learn.
        assert load.inner_step == 16 and list(load.inner) == [1]
        assert load.inner[1] == chunker.continuations(b.prompt_token_ids, 1, [16], cache_salt="t")
        # Shares 100 tokens of chunk 0 only (no full chunk hit): 96 tokens.
        c = SimpleNamespace(request_id="c", prompt_token_ids=a[:100] + [7] * 300, cache_salt="t")
        assert side.get_num_new_matched_tokens(c, 0) == 96
        # Another tenant finds none of it.
        d = SimpleNamespace(request_id="d", prompt_token_ids=b.prompt_token_ids, cache_salt="u")
        assert side.get_num_new_matched_tokens(d, 0) == 0
    finally:
        lookup._LOCAL.pop(("inner-test", 0), None)


def test_a_cache_reset_starts_a_key_epoch_and_releases_every_pin():
    """vLLM's reset_prefix_cache(reset_connector=True): nothing looked up before the reset
    keeps its keys, pins are released, and every later key differs from every earlier one."""
    from types import SimpleNamespace

    from lmcache_vllm import lookup

    seen: list[list[bytes]] = []
    unpinned: list[str] = []

    def fake_lookup(cs, n, digests, owner):
        seen.append(list(digests))
        return len(digests)

    lookup._LOCAL[("reset-test", 0)] = (fake_lookup, unpinned.append)
    try:
        side = _scheduler("reset-test")
        req = SimpleNamespace(request_id="r", prompt_token_ids=list(range(600)), cache_salt="t")
        assert side.get_num_new_matched_tokens(req, 0) > 0
        before = seen[-1]
        assert side.requests["r"].pinned
        assert side.reset_cache() is True
        assert unpinned == ["r"] and not side.requests
        again = SimpleNamespace(
            request_id="r2", prompt_token_ids=req.prompt_token_ids, cache_salt="t"
        )
        side.get_num_new_matched_tokens(again, 0)
        after = seen[-1]
        assert len(after) == len(before) and not set(after) & set(before)
        # vLLM's own hit ending inside a block: nothing is loaded after it.
        mid = SimpleNamespace(request_id="m", prompt_token_ids=req.prompt_token_ids, cache_salt="t")
        assert side.get_num_new_matched_tokens(mid, 40) == 0
        side.reset_cache()  # each reset is a new epoch
        side.get_num_new_matched_tokens(
            SimpleNamespace(request_id="r3", prompt_token_ids=req.prompt_token_ids, cache_salt="t"),
            0,
        )
        assert not set(seen[-1]) & (set(before) | set(after))
    finally:
        lookup._LOCAL.pop(("reset-test", 0), None)


def test_hit_sources_split_the_planned_load_by_tier_kind():
    """vLLM asks, at admission, where the tokens it will load come from: each chunk's
    kind as the farthest rank has it, clipped to the load range."""
    from types import SimpleNamespace

    from lmcache_vllm import lookup

    where = {0: ["host", "host", "disk"], 1: ["host", "remote", "host"]}
    for rank in (0, 1):
        lookup._LOCAL[("src-test", rank)] = (
            lambda cs, n, d, o: min(3, len(d)),
            lambda o: None,
            lookup._no_chains,
            lookup._no_chains,
            lambda o, r=rank: where[r],
        )
    try:
        side = _scheduler("src-test")
        side.client.world_size = 2
        side.config = side.config.replace(chunk_size=64)
        side.chunker = type(side.chunker)(64, side.config.hash_algorithm)
        req = SimpleNamespace(request_id="r", prompt_token_ids=list(range(400)), cache_salt=None)
        # vLLM's own cache has the first 32 tokens: the load is [32, 192).
        assert side.get_num_new_matched_tokens(req, 32) == 160
        side.update_state_after_alloc(req, None, 160)
        assert side.hit_sources(req, 160) == {"host": 32, "remote": 64, "disk": 64}
        assert side.hit_sources(req, 150) == {}, "counts that do not add up are not reported"
        where[1] = ["host"]  # a rank that says less than was found: unknown
        assert side.hit_sources(req, 160) == {}
    finally:
        for rank in (0, 1):
            lookup._LOCAL.pop(("src-test", rank), None)


def _spec_config(spec):
    from types import SimpleNamespace

    from vllm.v1.kv_cache_interface import KVCacheGroupSpec

    return SimpleNamespace(kv_cache_groups=[KVCacheGroupSpec(["layers.0.attn"], spec)])


def test_kv_cache_specs_lmcache_cannot_serve_are_refused_at_start():
    from lmcache_vllm.settings import checked_kv_spec
    from vllm.v1.kv_cache_interface import (
        ChunkedLocalAttentionSpec,
        FullAttentionSpec,
        SlidingWindowSpec,
    )

    shape = {"block_size": 16, "num_kv_heads": 2, "head_size": 64, "dtype": torch.bfloat16}
    cfg = CacheConfig(chunk_size=256)
    full = FullAttentionSpec(**shape)
    assert checked_kv_spec(_spec_config(full), cfg) is full
    wide = SlidingWindowSpec(**shape, sliding_window=4096)
    assert checked_kv_spec(_spec_config(wide), cfg) is wide
    with pytest.raises(ConfigError, match=r"sliding window \(128 tokens\).*at most 128"):
        checked_kv_spec(_spec_config(SlidingWindowSpec(**shape, sliding_window=128)), cfg)
    local = ChunkedLocalAttentionSpec(**shape, attention_chunk_size=8192)
    with pytest.raises(ValueError, match="this model's is ChunkedLocalAttentionSpec"):
        checked_kv_spec(_spec_config(local), cfg)
    # What vLLM 0.32's specs can say besides their kind.
    with pytest.raises(ValueError, match="non-causal attention layers"):
        checked_kv_spec(_spec_config(FullAttentionSpec(**shape, non_causal=True)), cfg)
    with pytest.raises(ValueError, match="4 tokens per state"):
        checked_kv_spec(_spec_config(FullAttentionSpec(**shape, tokens_per_state=4)), cfg)
    from vllm.v1.kv_cache_interface import KVQuantMode

    fp8 = FullAttentionSpec(**shape, kv_quant_mode=KVQuantMode.FP8_PER_TENSOR)
    assert checked_kv_spec(_spec_config(fp8), cfg) is fp8
    per_token = FullAttentionSpec(**shape, kv_quant_mode=KVQuantMode.INT8_PER_TOKEN_HEAD)
    with pytest.raises(ConfigError, match="int8_per_token_head quantization.*--kv-cache-dtype"):
        checked_kv_spec(_spec_config(per_token), cfg)


def test_parallel_layouts_that_split_a_requests_tokens_are_refused_at_start():
    from types import SimpleNamespace

    from lmcache_vllm.settings import check_parallelism

    def cfg(**sizes):
        base = {"pipeline_parallel_size": 1, "decode_context_parallel_size": 1}
        base["prefill_context_parallel_size"] = 1
        return SimpleNamespace(parallel_config=SimpleNamespace(**{**base, **sizes}))

    check_parallelism(cfg(tensor_parallel_size=8))
    with pytest.raises(ValueError, match="pipeline parallelism"):
        check_parallelism(cfg(pipeline_parallel_size=2))
    with pytest.raises(ValueError, match="--decode-context-parallel-size 2"):
        check_parallelism(cfg(decode_context_parallel_size=2))
    with pytest.raises(ValueError, match="--prefill-context-parallel-size 4"):
        check_parallelism(cfg(prefill_context_parallel_size=4))


def test_the_scheduler_never_loads_into_or_saves_from_vllms_null_block():
    """A sliding window's dropped KV sits in vLLM's null block (id 0) in the request's table."""
    from types import SimpleNamespace

    from lmcache_vllm import lookup
    from lmcache_vllm.scheduler_side import kept_from

    assert kept_from([0, 0, 7, 8], 16) == 32 and kept_from([5, 6], 16) == 0
    assert kept_from([0, 0], 16) == 32
    unpinned = []
    lookup._LOCAL[("null-test", 0)] = (lambda cs, n, d, o: len(d), unpinned.append)
    try:
        side = _scheduler("null-test")
        none = SimpleNamespace(
            req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
        )

        def step(rid, n_tokens, block_ids, computed):
            req = SimpleNamespace(
                request_id=rid, prompt_token_ids=list(range(n_tokens)), cache_salt=None
            )
            hit = side.get_num_new_matched_tokens(req, 0)
            side.update_state_after_alloc(req, None, hit)
            new = SimpleNamespace(req_id=rid, block_ids=(block_ids,), num_computed_tokens=hit)
            return hit, side.build_connector_meta(
                SimpleNamespace(
                    scheduled_new_reqs=[new],
                    scheduled_cached_reqs=none,
                    num_scheduled_tokens={rid: n_tokens - hit},
                )
            )

        # 600 tokens: 592 cached; vLLM kept blocks from token 320 on (the first 20 are null).
        hit, meta = step("a", 600, [0] * 20 + list(range(100, 118)), 592)
        (load,) = meta.loads
        assert hit == 592 and (load.load_from, load.load_until) == (320, 592)
        (save,) = meta.saves
        assert save.from_chunk == 2  # chunks 0 and 1 include null blocks: not stored
        # All of the hit before the window: nothing to load, and its pins go at once.
        hit, meta = step("b", 600, [0] * 37 + [200], 592)
        assert meta.loads == [] and "b" in unpinned
        # Chunked prefill of a sliding-window model: chunks saved in an earlier step are
        # not stored again later (their blocks may have left the window since, unannounced).
        side.sliding = True
        lookup._LOCAL[("null-test", 0)] = (lambda cs, n, d, o: 0, unpinned.append)
        req = SimpleNamespace(request_id="c", prompt_token_ids=list(range(900)), cache_salt=None)
        assert side.get_num_new_matched_tokens(req, 0) == 0
        side.update_state_after_alloc(req, None, 0)
        new = SimpleNamespace(req_id="c", block_ids=(list(range(1, 33)),), num_computed_tokens=0)
        first = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[new],
                scheduled_cached_reqs=none,
                num_scheduled_tokens={"c": 512},
            )
        )
        assert [(s.from_chunk, s.prompt.num_tokens) for s in first.saves] == [(0, 512)]
        cached = SimpleNamespace(
            req_ids=["c"],
            resumed_req_ids=set(),
            new_block_ids=[(list(range(33, 58)),)],
            num_computed_tokens=[512],
        )
        later = side.build_connector_meta(
            SimpleNamespace(
                scheduled_new_reqs=[], scheduled_cached_reqs=cached, num_scheduled_tokens={"c": 388}
            )
        )
        assert [(s.from_chunk, s.prompt.num_tokens) for s in later.saves] == [(2, 896)]
    finally:
        lookup._LOCAL.pop(("null-test", 0), None)


def test_with_a_sliding_window_async_saves_fence_every_step_they_are_in_flight():
    """Blocks leave the window (and go to other requests) in any step, unannounced: vLLM's
    stream must wait for queued save copies before it writes KV, as after a preemption."""
    from types import SimpleNamespace

    from lmcache_vllm.save_tracker import SaveTracker

    side = _scheduler("fence-test")
    side.tracker = SaveTracker(True)
    none = SimpleNamespace(
        req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
    )
    out = SimpleNamespace(
        scheduled_new_reqs=[], scheduled_cached_reqs=none, num_scheduled_tokens={}
    )
    side.tracker.planned(["r"])
    assert not side.build_connector_meta(out).fence  # full attention: blocks stay the request's
    side.sliding = True
    assert side.build_connector_meta(out).fence
    side.tracker.saving.clear()
    assert not side.build_connector_meta(out).fence


def test_a_hit_vllm_does_not_take_releases_its_pins_at_once():
    """vLLM may keep its own sub-block hit and load nothing external: the lookup's pins
    must not stay until the request finishes (they keep chunks from eviction)."""
    from types import SimpleNamespace

    from lmcache_vllm import lookup

    unpinned = []
    lookup._LOCAL[("pins-test", 0)] = (lambda cs, n, d, o: len(d), unpinned.append)
    try:
        side = _scheduler("pins-test")
        req = SimpleNamespace(request_id="r", prompt_token_ids=list(range(600)), cache_salt=None)
        assert side.get_num_new_matched_tokens(req, 0) == 592
        side.update_state_after_alloc(req, None, 0)
        assert unpinned == ["r"] and not side.requests["r"].pinned
        side.request_finished(req)
        assert unpinned == ["r"], "not released twice"
    finally:
        lookup._LOCAL.pop(("pins-test", 0), None)
