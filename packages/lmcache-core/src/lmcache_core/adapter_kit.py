"""What every engine adapter does around its cache, once: config overrides, the cache
engine (in this process, or on this host's ``lmcache server``), its metrics exporter,
and closing it all.

Why here: the vLLM connector and the SGLang storage backend did each of these
their own way, and the cache-server client is a third user. An adapter keeps
what is its engine's (reading the engine's memory, its config object, its
metrics API) and asks this kit for the rest::

    overrides = config_overrides(extra, adapter_keys={"model_id"})
    config = CacheConfig.load(overrides=overrides)
    cache = open_cache(config, model=..., layout=..., world_size=2, rank=1)
    cache.engine.lookup(...)
    cache.close()

``server_url`` in the config (or ``lmcache.server_url`` in the engine's extra
config) puts the chunks on the server; without it they live in the process,
as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lmcache_core.arena import Arena
from lmcache_core.auth import load_secret
from lmcache_core.cache_key import KeyNamespace
from lmcache_core.config import CacheConfig
from lmcache_core.engine import CacheEngine
from lmcache_core.layout import KVLayout
from lmcache_core.metrics import Metrics, start_exporter

logger = logging.getLogger(__name__)


def config_overrides(
    extra: Mapping[str, Any] | None,
    *,
    adapter_keys: Iterable[str] = (),
    ignored: Mapping[str, str] | None = None,
    translate: Mapping[str, Callable[[Any], tuple[str, Any]]] | None = None,
    where: str = "extra config",
) -> dict[str, Any]:
    """The cache config overrides in an engine's own config dict.

    ``adapter_keys`` are the adapter's and skipped; ``ignored`` keys (upstream's,
    with why they do nothing here) are skipped with a warning naming them;
    ``translate`` maps a key's value to a config key and value; every other key
    is a cache config key, ``lmcache.<key>`` standing for ``<key>`` as upstream
    LMCache's adapters read it. Unknown keys fail when the config is loaded,
    with the closest valid name.
    """
    skip = set(adapter_keys)
    ignored = ignored or {}
    translate = translate or {}
    out: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        if key in skip:
            continue
        if key in ignored:
            logger.warning("lmcache: %s.%s has no effect here (%s)", where, key, ignored[key])
            continue
        if key in translate:
            name, v = translate[key](value)
            out[name] = v
            continue
        out[key.removeprefix("lmcache.")] = value
    return out


@dataclass
class CacheInstance:
    """An adapter's cache: the engine, and its metrics exporter when there is one."""

    engine: CacheEngine
    exporter: Any = None

    @property
    def on_server(self) -> bool:
        return server_url(self.engine.config) is not None

    def close(self) -> None:
        """Write what lower tiers have queued, release the memory, stop the exporter."""
        if self.exporter is not None:
            try:
                self.exporter.shutdown()
            except Exception:
                logger.warning("stopping the metrics exporter failed", exc_info=True)
            self.exporter = None
        self.engine.close()


def server_url(config: CacheConfig) -> str | None:
    return getattr(config, "server_url", None) or None


def open_cache(
    config: CacheConfig,
    *,
    model: str,
    layout: KVLayout,
    world_size: int = 1,
    rank: int = 0,
    key_extra: Iterable[tuple[str, str]] = (),
    arena: Callable[[], Arena | None] | None = None,
    on_map: Callable[[Any], Any] | None = None,
    exporter_rank: int | None = None,
    client_info: Mapping[str, Any] | None = None,
) -> CacheInstance:
    """This rank's cache: its chunks on the host's ``lmcache server`` when the config
    names one (``server_url``), else in this process.

    ``arena()`` makes this process's DRAM arena (pinned memory on a GPU); it is
    not called in server mode, where ``on_map(mapping)`` is called instead with
    each mapping of the server's arena (a GPU adapter pins it). With
    ``exporter_rank``, lmcache's own Prometheus exporter serves the metrics on
    ``metrics_port + exporter_rank`` (engines without a metrics API of their own).
    """
    url = server_url(config)
    store_factory = None
    if url is not None:
        from lmcache_core.mp.address import parse_server_url
        from lmcache_core.mp.client import ServerChunkStore

        address = parse_server_url(url)
        secret = load_secret(config)
        timeout = float(getattr(config, "server_timeout", 5.0))
        info = dict(client_info or {})

        def store_factory(namespace: KeyNamespace, metrics: Metrics) -> ServerChunkStore:
            return ServerChunkStore(
                address,
                namespace,
                metrics=metrics,
                secret=secret,
                timeout=timeout,
                client_info=info,
                on_map=on_map,
            )

    engine = CacheEngine(
        config,
        model=model,
        layout=layout,
        world_size=world_size,
        rank=rank,
        key_extra=tuple(key_extra),
        arena=None if url is not None or arena is None else arena(),
        store_factory=store_factory,
    )
    exporter = None
    if exporter_rank is not None:
        exporter = start_exporter(
            engine.metrics, config.metrics_port, config.metrics_host, exporter_rank
        )
    return CacheInstance(engine, exporter)


# --------------------------------------------------------------------------- engine versions


@dataclass(frozen=True)
class EngineRange:
    """The engine releases an adapter supports: ``minimum <= version < below``.

    ``minimum`` is the release the adapter's tests run against (CI installs it);
    ``below`` is the first release not yet tried: the connector API of an engine
    changes between its minor releases. Declared once per adapter (its
    ``compat`` module) and in its package metadata (an extra named ``engine``);
    a test keeps the two equal.
    """

    engine: str
    distributions: tuple[str, ...]
    minimum: str
    below: str

    @property
    def specifier(self) -> str:
        return f">={self.minimum},<{self.below}"

    def installed(self) -> str | None:
        """The installed engine's version (the first of ``distributions`` installed)."""
        from importlib import metadata

        for dist in self.distributions:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    def check(self, version: str | None = None, *, error: type[Exception] = RuntimeError) -> None:
        """Refuse a release below :attr:`minimum` (``error``, saying what to install); warn,
        once per process, about one at or above :attr:`below`."""
        problem = self.problem(version)
        if problem is None:
            return
        if self.too_old(version):
            raise error(problem)
        if self.engine not in _WARNED_NEWER:
            _WARNED_NEWER.add(self.engine)
            logger.warning("lmcache: %s", problem)

    def too_old(self, version: str | None = None) -> bool:
        """Whether ``version`` (default: the installed one) is below :attr:`minimum`."""
        version = version if version is not None else self.installed()
        return version is not None and release_tuple(version) < release_tuple(self.minimum)

    def problem(self, version: str | None = None) -> str | None:
        """Why ``version`` (default: the installed one) is outside the range; None if inside
        (or not installed: importing the engine then says so)."""
        version = version if version is not None else self.installed()
        if version is None:
            return None
        have = release_tuple(version)
        if have < release_tuple(self.minimum):
            return (
                f"{self.engine} {version} is older than this adapter supports "
                f"({self.specifier}): upgrade {self.engine} to {self.minimum} or later"
            )
        if have >= release_tuple(self.below):
            return (
                f"{self.engine} {version} is newer than this adapter was tested with "
                f"({self.specifier}): its connector API may have changed; if it fails, "
                f"use {self.engine} < {self.below} or a newer lmcache"
            )
        return None


_WARNED_NEWER: set[str] = set()


def release_tuple(version: str) -> tuple[int, ...]:
    """The release numbers of a version string ("0.32.0+cpu" -> (0, 32, 0)), padded to 3,
    for comparing releases (pre-release and local parts are ignored)."""
    parts: list[int] = []
    for piece in version.split("+", 1)[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) != len(piece):
            break
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)
