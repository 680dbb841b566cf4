"""vLLM's built-in ``LMCacheConnectorV1`` delegating metrics and events to lmcache (no server)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from lmcache_core.keys import CacheKey
from lmcache_vllm import builtin_name
from lmcache_vllm.connector import LMCacheKVConnector
from lmcache_vllm.kv_events import BlockInfo, EventGate, WorkerEvents
from lmcache_vllm.stats import LMCachePromMetrics, LMCacheStats
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1
from vllm.v1.outputs import KVConnectorOutput


class _Side:
    def __init__(self, events):
        self.events = events
        self.engine = None


def _wrapper_over_ours(worker_events=None, gate=None):
    """A wrapper instance whose ``_lmcache_engine`` is lmcache's shim, built without vLLM."""
    from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl

    connector = object.__new__(LMCacheKVConnector)
    connector.worker = _Side(worker_events) if worker_events is not None else None
    connector.scheduler = _Side(gate) if gate is not None else None
    impl = object.__new__(LMCacheConnectorV1Impl)
    impl.connector = connector
    wrapper = object.__new__(LMCacheConnectorV1)
    wrapper._lmcache_engine = impl
    wrapper._kv_cache_events = None
    return wrapper


def test_the_wrapper_has_the_expected_shape_and_takes_the_delegates_once():
    assert builtin_name.why_not(LMCacheConnectorV1) is None or getattr(
        LMCacheConnectorV1, builtin_name.MARK, False
    )
    assert builtin_name.install() and builtin_name.install()  # idempotent
    assert getattr(LMCacheConnectorV1, builtin_name.MARK)
    stats = LMCacheConnectorV1.build_kv_connector_stats({"counters": {}, "gauges": {}})
    assert isinstance(stats, LMCacheStats)
    assert LMCacheConnectorV1.build_kv_connector_stats({"other": 1}) is None  # not ours


def test_a_changed_wrapper_is_left_alone_with_the_reason():
    class Changed:
        pass

    assert "KVConnectorBase_V1" in builtin_name.why_not(Changed)

    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    class OwnStats(KVConnectorBase_V1):
        def get_kv_connector_kv_cache_events(self): ...
        def update_connector_output(self, o): ...
        def take_events(self): ...
        def get_kv_connector_stats(self): ...

    assert "defines get_kv_connector_stats itself" in builtin_name.why_not(OwnStats)


def test_removals_flow_through_the_built_in_name_as_removals():
    """Worker: lmcache's events, typed as they are; scheduler: gated and published as is."""
    builtin_name.install()
    ev = WorkerEvents(block_size=4)
    key = CacheKey(b"k")
    ev.expect(key, 0, 8, BlockInfo([1, 2], list(range(8))))
    ev("stored", "cpu", [key])
    ev("removed", "cpu", [key])
    worker = _wrapper_over_ours(worker_events=ev)
    taken = worker.get_kv_connector_kv_cache_events()
    kinds = [type(e) for e in taken.get_all_events()]
    assert kinds == [BlockStored, BlockRemoved]  # never a removal turned into a store
    scheduler = _wrapper_over_ours(gate=EventGate(world_size=1))
    scheduler.update_connector_output(KVConnectorOutput(kv_cache_events=taken))
    published = list(scheduler.take_events())
    assert [type(e) for e in published] == [BlockStored, BlockRemoved]
    assert published[1].medium == "CPU" and published[1].block_hashes == [1, 2]


def test_another_implementation_keeps_the_wrappers_own_methods():
    builtin_name.install()

    class Upstream:  # upstream LMCache's impl: get_kv_events, no lmcache connector
        def get_kv_events(self):
            return []

    wrapper = object.__new__(LMCacheConnectorV1)
    wrapper._lmcache_engine = Upstream()
    wrapper._kv_cache_events = None
    assert wrapper.get_kv_connector_kv_cache_events() is None
    assert wrapper.get_kv_connector_stats() is None
    assert list(wrapper.take_events()) == []


def test_prom_metrics_are_lmcaches_unless_use_native():
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    builtin_name.install()
    registry = CollectorRegistry()

    def bound(cls):
        class InRegistry(cls):  # type: ignore[misc, valid-type]
            def __init__(self, *a, **kw):
                super().__init__(*a, registry=registry, **kw)

        return InRegistry

    types = {Gauge: bound(Gauge), Counter: bound(Counter), Histogram: bound(Histogram)}
    cfg = SimpleNamespace(kv_transfer_config=SimpleNamespace(kv_connector_extra_config={}))
    prom = LMCacheConnectorV1.build_prom_metrics(cfg, types, ["engine"], {0: ["0"]})
    assert isinstance(prom, LMCachePromMetrics)
    native = SimpleNamespace(
        kv_transfer_config=SimpleNamespace(kv_connector_extra_config={"use_native": True})
    )
    assert not isinstance(
        LMCacheConnectorV1.build_prom_metrics(native, types, ["engine"], {0: ["0"]}),
        LMCachePromMetrics,
    )


def test_every_call_lmcaches_connector_answers_reaches_it_through_the_wrapper():
    """The wrapper forwards some calls itself and inherits the rest from vLLM's base class
    (no-ops): each of lmcache's answers must reach vLLM. ``reset_cache`` above all: a
    weight update's cache reset must start a new key epoch, not return the base's None."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    assert builtin_name.install()
    ours = {
        name
        for klass in LMCacheKVConnector.__mro__
        if klass is not KVConnectorBase_V1 and issubclass(klass, KVConnectorBase_V1)
        for name in klass.__dict__
        if name in KVConnectorBase_V1.__dict__ and not name.startswith("__")
    }
    for name in sorted(ours):
        assert getattr(LMCacheConnectorV1, name) is not getattr(KVConnectorBase_V1, name), (
            f"vLLM's wrapper answers {name} with the base class's, not lmcache's"
        )

    calls = []

    class Connector(LMCacheKVConnector):
        def reset_cache(self):
            calls.append("reset")
            return True

        @property
        def requires_kv_delivery(self):
            return False

    wrapper = _wrapper_over_ours()
    wrapper._lmcache_engine.connector.__class__ = Connector
    assert wrapper.reset_cache() is True and calls == ["reset"]
    assert wrapper.requires_kv_delivery is False
