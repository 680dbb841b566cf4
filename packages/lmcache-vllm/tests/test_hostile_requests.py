"""What one client's request can do to the scheduler side: never more than lose its own cache.

Real vLLM ``Request`` objects against the scheduler side and the connector's
hooks, as vLLM's scheduler calls them (the end-to-end runs in a real engine,
in-process and against an lmcache server, are in ``test_vllm_engine.py``).
"""

from __future__ import annotations

import logging
import tracemalloc
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

from lmcache_vllm import lookup
from lmcache_vllm.connector import LMCacheKVConnector, SchedulerSide
from lmcache_vllm.metadata import LMCacheConnectorMetadata
from lmcache_vllm.request_keys import request_identity
from vllm.sampling_params import SamplingParams
from vllm.v1.request import Request

TOKENS = list(range(300))
BLOCKS = list(range(1, 21))  # 20 blocks of 16 tokens
NONE = SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])


def _request(rid, *, salt=None, params=None, tokens=TOKENS):
    sp = SamplingParams(max_tokens=1, extra_args={"kv_transfer_params": params} if params else None)
    return Request(rid, tokens, sp, None, cache_salt=salt)


@pytest.fixture
def connector():
    """The connector's scheduler role over a rank that holds every chunk it is asked for."""
    unpinned: list[str] = []
    lookup._LOCAL[("hostile-test", 0)] = (lambda cs, n, d, o: len(d), unpinned.append)
    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config={"chunk_size": 64},
            kv_role="kv_both",
            engine_id="hostile-test",
        ),
        cache_config=SimpleNamespace(block_size=16),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
    )
    c = object.__new__(LMCacheKVConnector)  # vLLM's base __init__ wants a whole VllmConfig
    c.scheduler, c.worker = SchedulerSide(cfg, None), None
    yield c, unpinned
    c.scheduler.close()
    lookup._LOCAL.pop(("hostile-test", 0), None)


def schedule(c, req):
    """One request through vLLM's order of hooks, as a new request of one step."""
    hit, _ = c.get_num_new_matched_tokens(req, 0)
    c.update_state_after_alloc(req, None, hit)
    sources = c.get_external_cache_hit_sources(req, hit)
    new = SimpleNamespace(req_id=req.request_id, block_ids=(BLOCKS,), num_computed_tokens=hit)
    so = SimpleNamespace(
        scheduled_new_reqs=[new],
        scheduled_cached_reqs=NONE,
        num_scheduled_tokens={req.request_id: len(TOKENS) - hit},
    )
    meta = c.build_connector_meta(so)
    delay, _ = c.request_finished(req, BLOCKS)
    return hit, meta, sources, delay


@pytest.mark.parametrize(
    "salt, params",
    [
        (None, {"lmcache.tag.user": "\ud800"}),  # a lone surrogate, as JSON's "\ud800" gives
        (None, {"lmcache.tag.\udfff": "alice"}),
        ("tenant-\ud83d", None),
        ("tenant-\ud83d", {"lmcache.tag.user": "alice"}),
    ],
)
def test_a_lone_surrogate_serves_that_request_without_the_cache_and_no_other(
    connector, salt, params
):
    """It used to pass the first hook (whose error was caught) and raise a
    UnicodeEncodeError from update_state_after_alloc into vLLM's scheduler, after which
    every ordinary request failed in vLLM's KV cache manager."""
    c, _ = connector
    bad = _request("bad", salt=salt, params=params)
    hit, meta, _, delay = schedule(c, bad)  # no hook raises into vLLM's scheduler
    assert (hit, meta.loads, meta.saves, delay) == (0, [], [], False)
    assert request_identity(bad) is None  # refused at the first hook, as malformed
    assert "bad" not in c.scheduler.requests and "bad" not in c.scheduler.uncached
    for i in range(3):  # ordinary requests go on hitting and storing
        hit, meta, sources, _ = schedule(c, _request(f"ok{i}", salt="tenant"))
        assert hit == 288 and len(meta.loads) == 1 and len(meta.saves) == 1
        assert sum(sources.values()) == 288


def test_an_lmcache_error_in_any_hook_serves_that_request_uncached(connector, monkeypatch):
    """Every scheduler-side hook is wrapped: an error costs that request its cache, and a
    load vLLM already counted on is sent as one that loads nothing, so the workers report
    its blocks and vLLM recomputes them (never reads blocks nobody wrote)."""
    c, unpinned = connector
    side = c.scheduler

    def boom(*args, **kwargs):
        raise RuntimeError("an lmcache bug")

    # get_num_new_matched_tokens: a miss, and the request stays uncached for good.
    with monkeypatch.context() as m:
        m.setattr(side.chunker, "chunk", boom)
        assert schedule(c, _request("a"))[0] == 0
    # update_state_after_alloc after vLLM took 288 tokens: a failed load of them.
    req = _request("b")
    hit, _ = c.get_num_new_matched_tokens(req, 0)
    assert hit == 288
    with monkeypatch.context() as m:
        m.setattr(side, "_state", boom)
        c.update_state_after_alloc(req, None, hit)
    assert "b" in unpinned, "its pins are released at once"
    new = SimpleNamespace(req_id="b", block_ids=(BLOCKS,), num_computed_tokens=hit)
    meta = c.build_connector_meta(
        SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=NONE,
                        num_scheduled_tokens={"b": 12})
    )  # fmt: skip
    (spec,) = meta.loads
    assert (spec.req_id, spec.load_from, spec.load_until) == ("b", 0, 288)
    assert spec.prompt.digests == [] and spec.block_ids == BLOCKS  # loads nothing: reported
    assert meta.saves == []
    assert c.request_finished(req, BLOCKS) == (False, None)
    # build_connector_meta: one request's planning fails, the step's others are planned.
    x, y = _request("x"), _request("y")
    for r in (x, y):
        c.update_state_after_alloc(r, None, c.get_num_new_matched_tokens(r, 0)[0])
    plan_load = side._plan_load

    def fail_for_x(req_id, st, meta):
        if req_id == "x":
            raise RuntimeError("an lmcache bug")
        plan_load(req_id, st, meta)

    monkeypatch.setattr(side, "_plan_load", fail_for_x)
    news = [SimpleNamespace(req_id=r, block_ids=(BLOCKS,), num_computed_tokens=288) for r in "xy"]
    meta = c.build_connector_meta(
        SimpleNamespace(scheduled_new_reqs=news, scheduled_cached_reqs=NONE,
                        num_scheduled_tokens={"x": 12, "y": 12})
    )  # fmt: skip
    assert isinstance(meta, LMCacheConnectorMetadata)
    loads = {s.req_id: s for s in meta.loads}
    assert loads["y"].prompt.digests and not loads["x"].prompt.digests  # x: recomputed
    assert [s.req_id for s in meta.saves] == ["y"]
    # request_finished answers the delayed-free rule even when its clean-up fails.
    monkeypatch.setattr(side.client, "unpin", boom)
    side.tracker.enabled = True
    side.tracker.planned(["y"])
    assert c.request_finished(y, BLOCKS) == (True, None)


def test_unknown_controls_are_logged_and_kept_bounded(connector, caplog):
    """200 requests with 100 kB unknown lmcache.<name> controls kept 19 MiB of log
    messages in memory; names and values are cut, and only digests are remembered."""
    c, _ = connector
    side = c.scheduler
    tracemalloc.start()
    try:
        with caplog.at_level(logging.INFO):
            before = tracemalloc.take_snapshot()
            for i in range(200):
                name = f"lmcache.{i:03d}" + "x" * 100_000
                params = {name: "y" * 100_000, "lmcache.tag.big" + "z" * 100_000: "v"}
                for req in (
                    _request(f"u{i}", params={name: "y" * 100_000}),
                    _request(f"t{i}", params=params),  # a tag name over the limit: uncached
                ):
                    side.get_num_new_matched_tokens(req, 0)
                    c.request_finished(req, BLOCKS)
                    del req
            del params
            after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert kept < 1 << 20, f"{kept} bytes kept after 200 requests"
    records = [r for r in caplog.records if "lmcache" in r.getMessage()]
    assert records and max(len(r.getMessage()) for r in records) <= 400
    assert any("is unknown" in r.getMessage() for r in records)
    assert any("limited to 1024 characters" in r.getMessage() for r in records)
