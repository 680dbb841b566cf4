"""The versioned plugin API: a plugin written for the previous version keeps passing the
shipped suites (with a warning that says what to change), one written for a version this
lmcache-core does not serve is refused when it is loaded, by name, and a third party's
backend declares its own extra_config keys."""

from __future__ import annotations

import logging
import sys
import textwrap
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from lmcache_core import PLUGIN_API_VERSION, CacheConfig, CacheEngine, KVLayout, plugins
from lmcache_core.auth import FrameSealer
from lmcache_core.backends.base import BackendCapabilities, BackendContext, StorageBackend
from lmcache_core.backends.frame_store import FrameParts, FrameStore, Oversized
from lmcache_core.backends.fs import SharedFSBackend
from lmcache_core.errors import ConfigError, PluginAPIError
from lmcache_core.eviction.base import EvictionPolicy
from lmcache_core.metrics import Metrics
from lmcache_core.plugin_api import OLDEST_PLUGIN_API_VERSION
from lmcache_core.pool import SlotPool
from lmcache_core.serdes.base import Serde
from lmcache_core.serdes.compressed import ZstdSerde
from lmcache_core.testing import (
    ChunkFactory,
    StorageBackendTests,
    backend_state_machine,
    chunk_payload,
    test_key,
)
from lmcache_core.testing.scratch import scratch_dir
from lmcache_core.transport import Transport

SECRET = b"0123456789abcdef-plugin-api-secret"
ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------- plugin API 1


def old_style_store_class() -> type[FrameStore]:
    """A frame store exactly as last month's documented contract had it: ``_read(names)``.

    A new class each call (the deprecation warning is given as a class is made).
    """

    class OldDictStore(FrameStore):
        name = "olddict"
        capabilities = BackendCapabilities(persistent=True, shared=True, exact_usage=False)

        def __init__(self, **kwargs):  # type: ignore[no-untyped-def]
            super().__init__(**kwargs)
            self.values: dict[str, bytes] = {}
            self.lock = threading.Lock()
            self.reads: list[list[str]] = []

        def _read(self, names):  # type: ignore[no-untyped-def,override]  # plugin API 1
            with self.lock:
                self.reads.append(list(names))
                return [self.values.get(n) for n in names]

        def _write(self, items: Iterable[tuple[str, FrameParts]]) -> list[bool]:
            out = []
            with self.lock:
                for name, parts in items:
                    self.values.setdefault(name, b"".join(bytes(p) for p in parts))
                    out.append(True)
            return out

        def _exists(self, names: list[str]) -> list[bool]:
            with self.lock:
                return [n in self.values for n in names]

        def _delete(self, names: list[str]) -> int:
            with self.lock:
                return sum(self.values.pop(n, None) is not None for n in names)

        def _names(self) -> Iterator[str]:
            with self.lock:
                return iter(list(self.values))

        @property
        def capacity_bytes(self) -> int:
            return sys.maxsize

    return OldDictStore


with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    OldDictStore = old_style_store_class()


class TestPluginAPI1FrameStore(StorageBackendTests):
    """The shipped storage suite, hostile values included, on a plugin API 1 store."""

    def make_backend(self, capacity_bytes, slot_bytes):
        return OldDictStore(max_chunk_bytes=slot_bytes)

    def raw_get(self, backend, key):
        return backend.values.get(backend.name_of(key))

    def raw_set(self, backend, key, value):
        backend.values[backend.name_of(key)] = bytes(value)


class TestPluginAPI1FrameStoreAuthenticated(TestPluginAPI1FrameStore):
    authenticated = True

    def make_backend(self, capacity_bytes, slot_bytes):
        return OldDictStore(max_chunk_bytes=slot_bytes, sealer=FrameSealer(SECRET))


TestPluginAPI1FrameStoreStateful = backend_state_machine(
    lambda capacity_bytes, slot_bytes: OldDictStore(max_chunk_bytes=slot_bytes), max_examples=25
).TestCase


def test_a_plugin_api_1_store_is_warned_about_with_what_to_change(caplog):
    with pytest.warns(DeprecationWarning) as record:
        cls = old_style_store_class()
    (message,) = [str(w.message) for w in record if w.category is DeprecationWarning]
    assert "OldDictStore" in message and "plugin API 1" in message
    assert "reads are unbounded" in message
    assert "_read(self, names, limit)" in message and "Oversized" in message
    assert f"api_version = {PLUGIN_API_VERSION}" in message
    # In the log too, once per class (a DeprecationWarning is hidden outside tests).
    with caplog.at_level(logging.WARNING, logger="lmcache_core.backends.frame_store"):
        cls(max_chunk_bytes=4096)
        cls(max_chunk_bytes=4096)
    logged = [r.getMessage() for r in caplog.records if "reads are unbounded" in r.getMessage()]
    assert len(logged) == 1 and "OldDictStore" in logged[0]


def test_a_plugin_api_1_store_is_read_without_the_limit_and_checked_after():
    f = ChunkFactory(4096)
    store = OldDictStore(max_chunk_bytes=4096)
    try:
        made = f.make(test_key(1))
        assert store.put([made]) == [True]
        made.release()
        (got,) = store.get([test_key(1)], f.allocate)
        assert got is not None and bytes(got.view) == chunk_payload(test_key(1), 4096)
        got.release()
        assert store.reads == [[store.name_of(test_key(1))]]  # called as _read(names)
        # A value larger than a frame can be is read whole (API 1 cannot help it), then
        # refused: a counted miss, and deleted.
        store.values[store.name_of(test_key(2))] = b"\0" * (store.max_value_bytes + 1)
        assert store.get([test_key(2)], f.allocate) == [None]
        assert store.name_of(test_key(2)) not in store.values
        assert store.metrics.get("lmcache:num_corrupt_chunks", tier="olddict") == 1
    finally:
        store.close()
        f.close()


def test_a_plugin_api_2_store_gets_no_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class NewStore(OldDictStore):
            api_version = 2

            def _read(self, names, limit):  # type: ignore[no-untyped-def,override]
                values = [self.values.get(n) for n in names]
                return [Oversized(len(v)) if v and len(v) > limit else v for v in values]

    assert not [w for w in caught if w.category is DeprecationWarning]
    assert NewStore._read_takes_limit
    assert not OldDictStore._read_takes_limit


def test_a_read_signature_neither_api_can_call_is_refused_when_the_class_is_made():
    with pytest.raises(PluginAPIError, match=r"NoNames: its _read\(self\) cannot be called"):

        class NoNames(OldDictStore):
            def _read(self):  # type: ignore[no-untyped-def,override]
                return []

    with pytest.raises(PluginAPIError, match=r"_read\(self, names, limit, how\) cannot be"):

        class TooMany(OldDictStore):
            def _read(self, names, limit, how):  # type: ignore[no-untyped-def,override]
                return []

    # Declaring plugin API 2 while keeping API 1's _read is a contradiction, said so.
    with pytest.raises(PluginAPIError, match="declares plugin API 2, but its _read.*no limit"):

        class Claims2(OldDictStore):
            api_version = 2

    # Declaring plugin API 1 outright is served (with the warning).
    with pytest.warns(DeprecationWarning, match="unbounded"):

        class Says1(OldDictStore):
            api_version = 1

    assert not Says1._read_takes_limit


def test_declared_versions_this_lmcache_does_not_serve_are_refused_by_name():
    with pytest.raises(PluginAPIError) as e:

        class Future(StorageBackend):
            api_version = PLUGIN_API_VERSION + 1

    assert "Future" in str(e.value) and f"plugin API {PLUGIN_API_VERSION + 1}" in str(e.value)
    assert "upgrade lmcache-core" in str(e.value)
    with pytest.raises(PluginAPIError, match="no longer loads"):

        class Ancient(StorageBackend):
            api_version = OLDEST_PLUGIN_API_VERSION - 1


def test_the_api_version_is_public_and_every_abc_carries_it():
    assert PLUGIN_API_VERSION >= 2
    for abc in (StorageBackend, FrameStore, EvictionPolicy, Serde, Transport):
        assert abc.api_version == PLUGIN_API_VERSION
        assert dict(abc.extra_config_keys) == {}
    for name in plugins.installed_names(plugins.BACKENDS):
        assert plugins.load_plugin(plugins.BACKENDS, name).api_version == PLUGIN_API_VERSION


def test_the_changelog_records_the_current_plugin_api():
    """A plugin API change gets a CHANGELOG line (and so does every later bump)."""
    text = (ROOT / "packages/lmcache-core/CHANGELOG.md").read_text()
    assert f"plugin API {PLUGIN_API_VERSION}" in text
    assert "_read(names, limit)" in text
    for package in ("lmcache-core", "lmcache-cuda", "lmcache-vllm", "lmcache-sglang"):
        assert (ROOT / "packages" / package / "CHANGELOG.md").is_file(), package
    assert (ROOT / "packages/lmcache-nixl/CHANGELOG.md").is_file()


# --------------------------------------------------------------------------- common arguments


def test_frame_stores_take_the_shared_arguments_from_one_place():
    pool = SlotPool.anonymous(1 << 20, 8192)
    context = BackendContext(layout=None, pool=pool, metrics=Metrics(), secret=SECRET)
    config = CacheConfig.from_dict(
        {"remote_url": f"fs://{scratch_dir()}", "remote_serde": "zstd", "remote_encryption": True}
    )
    common = SharedFSBackend.common_kwargs(config, context)
    assert set(common) == {"serde", "metrics", "max_chunk_bytes", "sealer"}
    store = SharedFSBackend.from_config(config, context)
    try:
        assert isinstance(store.serde, ZstdSerde)
        assert store.metrics is context.metrics
        assert store.max_chunk_bytes == pool.slot_bytes == 8192
        assert store.sealer is not None and store.sealer.encrypt
    finally:
        store.close()
    # Without the secret a shared tier refuses to start, saying how to set one ...
    bare = BackendContext(layout=None, pool=pool, metrics=Metrics())
    plain = config.replace(remote_encryption=False)
    with pytest.raises(ConfigError, match="has no deployment secret.*LMCACHE_AUTH_SECRET"):
        SharedFSBackend.common_kwargs(plain, bare)
    # ... unless the config opts out: no sealer then, and the tier says so in its gauge.
    opted_out = plain.replace(allow_unauthenticated_shared_tiers=True)
    assert SharedFSBackend.common_kwargs(opted_out, bare)["sealer"] is None
    assert bare.metrics.get("lmcache:tier_authenticated", tier="fs") == 0


# --------------------------------------------------------------------------- third-party plugins


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """``install_plugin(group, name, source)``: a real distribution with one entry point."""
    modules: list[str] = []

    def install(group: str, name: str, source: str) -> str:
        module = f"lmcache_thirdparty_{uuid.uuid4().hex[:8]}"
        root = tmp_path / module
        root.mkdir()
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        dist = root / f"{module}-1.0.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n"
        )
        (dist / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}:Plugin\n")
        monkeypatch.syspath_prepend(str(root))
        plugins.refresh()
        modules.append(module)
        return module

    yield install
    monkeypatch.undo()
    plugins.refresh()
    for module in modules:
        sys.modules.pop(module, None)


FUTURE_BACKEND = """
from lmcache_core.backends.base import StorageBackend

class Plugin(StorageBackend):
    name = "future"
    api_version = 99
"""


def test_a_plugin_for_a_future_api_is_refused_at_load_naming_it(install_plugin):
    module = install_plugin("lmcache.backends", "future", FUTURE_BACKEND)
    with pytest.raises(PluginAPIError) as e:
        plugins.load_plugin(plugins.BACKENDS, "future")
    message = str(e.value)
    dist = module.replace("_", "-")
    assert f"lmcache.backends plugin 'future' ({module}:Plugin from {dist} 1.0)" in message
    assert "written for plugin API 99" in message and "upgrade lmcache-core" in message
    # Building an engine with it stops there, before anything is read or written.
    config = CacheConfig.from_dict({"remote_url": "future://x", "max_local_cpu_size": "1MiB"})
    layout = KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 4)
    with pytest.raises(PluginAPIError, match="plugin 'future'.*plugin API 99"):
        CacheEngine(config, model="m", layout=layout)
    # With extra_config to check, already when the config is loaded.
    with pytest.raises(ConfigError, match="plugin 'future'.*plugin API 99"):
        CacheConfig.from_dict({"remote_url": "future://x", "extra_config": {"k": 1}})


def test_any_kind_of_plugin_declaring_a_future_api_is_refused_at_load(install_plugin):
    install_plugin(
        "lmcache.eviction_policies",
        "later",
        """
        from lmcache_core.eviction.lru import LRUPolicy

        class Plugin(LRUPolicy):
            name = "later"
            api_version = 7
        """,
    )
    with pytest.raises(PluginAPIError, match=r"lmcache.eviction_policies plugin 'later'.*API 7"):
        plugins.load_plugin(plugins.EVICTION_POLICIES, "later")


TAPE_BACKEND = """
from lmcache_core.backends.base import StorageBackend

class Plugin(StorageBackend):
    name = "tape"
    api_version = 2
    extra_config_keys = {"tape_speed": "how fast the tape runs", "tape_drive": "which drive"}
"""


def test_a_third_party_backend_declares_its_own_extra_config_keys(install_plugin):
    install_plugin("lmcache.backends", "tape", TAPE_BACKEND)
    config = CacheConfig.from_dict(
        {"remote_url": "tape://vault", "extra_config": {"tape_speed": 3, "tape_drive": "st0"}}
    )
    assert config.extra_config["tape_speed"] == 3
    with pytest.raises(ConfigError, match="unknown key 'tape_sped'; did you mean 'tape_speed'"):
        CacheConfig.from_dict({"remote_url": "tape://vault", "extra_config": {"tape_sped": 3}})


def test_a_third_party_tiers_key_without_its_tier_warns_naming_the_tier(install_plugin, caplog):
    install_plugin("lmcache.backends", "tape", TAPE_BACKEND)
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        CacheConfig.from_dict({"extra_config": {"tape_speed": 3}})
    assert any(
        "tape_speed has no effect" in r.getMessage() and "the tape tier" in r.getMessage()
        for r in caplog.records
    )


SHARED_NOT_A_FRAME_STORE = """
from lmcache_core.backends.base import BackendCapabilities, StorageBackend

class Plugin(StorageBackend):
    name = "plainshared"
    capabilities = BackendCapabilities(persistent=True, shared=True)

    @classmethod
    def from_config(cls, config, context):
        raise RuntimeError("built")
"""


def test_a_third_party_shared_tier_that_is_no_frame_store_is_refused_without_a_secret(
    install_plugin, monkeypatch
):
    """The secure default is the engine's, not each backend's: a shared tier written from
    scratch (not a FrameStore, which refuses by itself) is refused before it is built."""
    monkeypatch.delenv("LMCACHE_AUTH_SECRET", raising=False)
    install_plugin("lmcache.backends", "plainshared", SHARED_NOT_A_FRAME_STORE)
    layout = KVLayout("vllm_flash", "bfloat16", 2, 2, 8, 4)
    config = CacheConfig.from_dict({"remote_url": "plainshared://x", "max_local_cpu_size": "1MiB"})
    with pytest.raises(ConfigError, match=r"plainshared://x.*has no deployment secret"):
        CacheEngine(config, model="m", layout=layout)
    opted_out = CacheConfig.from_dict({
        "remote_url": "plainshared://x", "max_local_cpu_size": "1MiB",
        "allow_unauthenticated_shared_tiers": True,
    })  # fmt: skip
    with pytest.raises(RuntimeError, match="built"):
        CacheEngine(opted_out, model="m", layout=layout)
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", "a6f0c2e91d7b4c58a3e0f1d2b9c8e7a6")
    with pytest.raises(RuntimeError, match="built"):
        CacheEngine(config, model="m", layout=layout)
