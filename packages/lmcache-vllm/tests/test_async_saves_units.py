"""The async-save protocol between the scheduler side and the workers, step by step.

vLLM's scheduler output and config are stand-ins here (``SimpleNamespace``);
``test_vllm_engine.py::test_async_saves_*`` runs the same protocol in a real
engine. The rule both sides apply: a request for which a save was ever
planned keeps its blocks when it finishes (``request_finished`` says delay)
until a worker reports it from ``get_finished``, which it does once none of
its saves is in flight.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")

from lmcache_core import CacheConfig, CacheEngine, KVLayout
from lmcache_core.staged_store import SaveQueue, StagedStore
from lmcache_vllm import lookup
from lmcache_vllm.metadata import LMCacheConnectorMetadata, PromptRef, SaveSpec
from lmcache_vllm.scheduler_side import SchedulerSide
from lmcache_vllm.settings import async_saves
from lmcache_vllm.worker_side import WorkerSide


def _config(engine_id: str, extra: dict, device: str | None = None):
    cfg = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(
            kv_connector_extra_config=extra, kv_role="kv_both", engine_id=engine_id
        ),
        cache_config=SimpleNamespace(block_size=16),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
    )
    if device is not None:
        cfg.device_config = SimpleNamespace(device_type=device)
    return cfg


def _output(new=(), preempted=()):
    none = SimpleNamespace(
        req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[]
    )
    return SimpleNamespace(
        scheduled_new_reqs=[
            SimpleNamespace(req_id=r, block_ids=(list(range(1, 41)),), num_computed_tokens=0)
            for r, _ in new
        ],
        scheduled_cached_reqs=none,
        num_scheduled_tokens={r: n for r, n in new},
        preempted_req_ids=set(preempted),
    )


def test_auto_means_on_gpus_and_off_on_the_cpu_backend():
    assert async_saves(_config("x", {}, "cuda"))
    assert not async_saves(_config("x", {}, "cpu"))
    assert not async_saves(_config("x", {}))  # no device config: the CPU
    assert async_saves(_config("x", {"async_saves": "true"}, "cpu"))
    assert not async_saves(_config("x", {"async_saves": False}, "cuda"))


@pytest.mark.parametrize("on", [True, False])
def test_the_scheduler_delays_exactly_the_requests_it_planned_saves_for(on):
    lookup._LOCAL[("async-sched", 0)] = (lambda cs, n, d, o: 0, lambda o: None)
    try:
        side = SchedulerSide(_config("async-sched", {"async_saves": on}), None)
        saved = SimpleNamespace(
            request_id="saved", prompt_token_ids=list(range(600)), cache_salt=None
        )
        short = SimpleNamespace(request_id="short", prompt_token_ids=[1, 2, 3], cache_salt=None)
        for req in (saved, short):
            assert side.get_num_new_matched_tokens(req, 0) == 0
        meta = side.build_connector_meta(_output(new=[("saved", 600), ("short", 3)]))
        assert [s.req_id for s in meta.saves] == ["saved"]  # 3 tokens: not a whole block
        assert not meta.fence
        # Preempted while its save may be in flight: the workers fence this step.
        assert side.build_connector_meta(_output(preempted=["saved"])).fence is on
        assert not side.build_connector_meta(_output(preempted=["short"])).fence
        assert side.request_finished(saved) is on
        assert side.request_finished(short) is False
        assert side.request_finished(saved) is False  # once only
    finally:
        lookup._LOCAL.pop(("async-sched", 0), None)


class Switch:
    def __init__(self) -> None:
        self.on = False

    def done(self) -> bool:
        return self.on

    def wait(self) -> None:
        self.on = True


def test_a_worker_reports_a_finished_request_once_its_saves_are_done():
    worker = WorkerSide(_config("async-worker", {"async_saves": True}), None)
    layout = KVLayout("vllm_flash", "bfloat16", 1, 1, 8, 16)
    engine = CacheEngine(
        CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"}),
        model="m",
        layout=layout,
    )
    try:
        ref = PromptRef(16, 16, [b"x" * 32])
        meta = LMCacheConnectorMetadata(saves=[SaveSpec("a", ref, [0]), SaveSpec("b", ref, [1])])
        worker.wait_for_save(meta)  # no engine registered yet: noted all the same
        worker.saves = SaveQueue(engine)
        copy = Switch()
        worker.saves.add("a", StagedStore([], copy))
        # "c" never saved: vLLM freed its blocks itself; "a" is still being copied.
        assert worker.get_finished({"a", "b", "c"}) == {"b"}
        assert worker.get_finished(set()) == set()
        copy.on = True  # the copy finished on the device
        assert worker.get_finished(set()) == {"a"}
        assert worker.get_finished({"a"}) == set()  # reported once
        assert len(worker.saves) == 0
    finally:
        worker.close()
        engine.close()


def test_a_worker_with_synchronous_saves_reports_nothing():
    worker = WorkerSide(_config("sync-worker", {"async_saves": False}), None)
    try:
        ref = PromptRef(16, 16, [b"x" * 32])
        worker.wait_for_save(LMCacheConnectorMetadata(saves=[SaveSpec("a", ref, [0])]))
        assert worker.get_finished({"a"}) == set()
    finally:
        worker.close()


@pytest.mark.parametrize("layerwise", [False, True], ids=["whole", "layerwise"])
def test_a_load_that_falls_short_stores_nothing_of_that_request_in_the_same_step(layerwise):
    """The scheduler plans a request's load and its save in one step. If the load falls
    short (a chunk lost between lookup and load: a shared tier's read failed), the blocks
    past what landed hold another request's KV: storing them would put that KV under
    this prompt's keys for every later request. vLLM recomputes them; lmcache stores
    nothing of that request this step."""
    import lmcache_cuda
    import torch
    from lmcache_cuda.layerwise import LayerMemories
    from lmcache_vllm.metadata import LoadSpec

    layout = KVLayout("vllm_flash", "float32", 2, 1, 8, 16)
    engine = CacheEngine(
        CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"}),
        model="m",
        layout=layout,
    )
    layers = [torch.zeros(2, 8, 16, 1, 8) for _ in range(2)]
    worker = WorkerSide(_config("short-load", {"async_saves": False}), None)
    try:
        worker.engine = engine
        worker._paged = lmcache_cuda.paged_memory(layout, layers)
        if layerwise:
            names = [f"model.layers.{i}.self_attn.attn" for i in range(2)]
            worker._layer_mem = LayerMemories(layout, layers, names, whole=worker._paged)
        worker.saves = SaveQueue(engine)
        d0, d1 = b"\x01" * 32, b"\x02" * 32
        for t in layers:
            t[:, 1].fill_(1.0)  # block 1: chunk 0's KV, as computed
        first = PromptRef(16, 16, [d0])
        stored = LMCacheConnectorMetadata(saves=[SaveSpec("a", first, [1])])
        worker.start_load_kv(stored)
        for name in names if layerwise else []:
            worker.save_kv_layer(name)
        worker.wait_for_save(stored)
        assert engine.lookup_chunks(first.prompt()) == 1  # chunks found
        # Request b: the same first chunk, then a second one. Its blocks 2 and 3 hold
        # another request's KV (7.0) when the step starts; only chunk 0 is cached.
        for t in layers:
            t[:, 2:4].fill_(7.0)
        both = PromptRef(16, 32, [d0, d1])
        step = LMCacheConnectorMetadata(
            loads=[LoadSpec("b", both, [2, 3], 0, 32)],  # promised 32, 16 are there
            saves=[SaveSpec("b", both, [2, 3])],
        )
        worker.start_load_kv(step)
        for name in names if layerwise else []:
            worker.wait_for_layer_load(name)
            worker.save_kv_layer(name)
        worker.wait_for_save(step)
        assert worker.take_failed_blocks() == {3}, "vLLM recomputes the block not loaded"
        assert engine.lookup_chunks(both.prompt()) == 1, (
            "chunk 1 was stored from a block that held another request's KV"
        )
        assert len(worker.saves) == 0
    finally:
        worker.close()
        engine.close()
