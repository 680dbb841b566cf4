"""``extra_config``: plugins' settings, each key declared by the plugin that reads it.

Top-level keys are the config's own and strict. ``extra_config`` holds the
settings of plugins (``redis_ttl``, ``s3_region``, a third party's tier's
own), so the config cannot list them: each reader declares the keys it reads
in a class attribute ``extra_config_keys`` (name -> one line): storage
backends, serdes, transports and eviction policies (their ABCs default to
none), and :data:`ENGINE_KEYS` holds what the engine adapters read. When a
config is loaded, each key of its ``extra_config`` is one of:

* read by a plugin in use (the tiers the config turns on, their serde,
  transport and eviction policy) or by the engine adapters: fine;
* a secret (``auth_secret``, ...): an error wherever it comes from, saying how
  the secret is set (it is never a config value);
* upstream LMCache's and not used here: accepted, with one warning naming them
  (as upstream's top-level keys);
* read by an installed plugin that this config does not use (``redis_ttl``
  without a Redis tier): accepted, with a warning naming the plugin;
* anything else (a typo, a top-level key put here): unknown, with the closest
  name. An error in a config file and in overrides; a warning in
  ``LMCACHE_EXTRA_CONFIG``, as unknown ``LMCACHE_*`` variables are (the
  environment is shared with other tools and layers of a deployment).

A plugin that cannot be loaded (not installed, or written for another plugin
API) makes the check of unknown names wait: that failure is the error.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from lmcache_core.config_sources import SECRET_KEYS
from lmcache_core.errors import PluginAPIError

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

logger = logging.getLogger("lmcache_core.config")

#: ``extra_config`` keys the engine adapters read, whatever the tiers.
ENGINE_KEYS: Mapping[str, str] = {
    "model_id": "the model's identity in cache keys, in place of the name or path the engine "
    "was given, so instances loading the same weights from different paths share their "
    "cache (read by the vLLM adapter)",
}

#: ``extra_config`` keys upstream LMCache reads that have no effect here (logged once).
UPSTREAM_EXTRA_KEYS = frozenset(
    """audit_backend_enabled clear_cache_timeout_ms disk_io_threads enable_nixl_storage
    kv_object_store_enable lookup_backoff_time nixl_async_put nixl_backend
    nixl_backend_params nixl_enable_prog_thread nixl_endpoint_list nixl_path nixl_pool_size
    nixl_presence_cache nixl_sync_mode nixl_use_hugepages region
    remote_enable_mla_worker_id_as0 resp_num_threads s3_enable_s3express s3_file_prefix
    s3_max_inflight_reqs s3_max_io_concurrency s3_part_size s3_prefer_http2 save_chunk_meta
    save_only_first_rank use_direct_io""".split()
)
#: Upstream's families of ``extra_config`` keys (its dynamically loaded backends).
UPSTREAM_EXTRA_PREFIXES = ("external_backend.", "storage_plugin.", "remote_storage_plugin.")


@dataclass(frozen=True)
class Reader:
    """Something that reads ``extra_config``, and the keys it declares."""

    label: str  # "the redis tier"
    keys: Mapping[str, str]


def declared_keys(cls: object) -> Mapping[str, str]:
    """A plugin class's ``extra_config_keys`` (a plain list of names is taken too)."""
    keys = getattr(cls, "extra_config_keys", None) or {}
    if isinstance(keys, Mapping):
        return {str(k): str(v) for k, v in keys.items()}
    if isinstance(keys, list | tuple | set | frozenset):
        return dict.fromkeys(map(str, keys), "")
    return {}


def _wanted(config: CacheConfig) -> list[tuple[str, str, str]]:
    """(entry-point group, name, label) of each plugin the config uses."""
    from lmcache_core.plugins import BACKENDS, EVICTION_POLICIES, SERDES, TRANSPORTS

    wanted: list[tuple[str, str, str]] = []
    if config.local_cpu:
        wanted.append((BACKENDS, "cpu", "the cpu tier"))
        policy = config.cache_policy
        wanted.append((EVICTION_POLICIES, policy, f"the {policy} eviction policy"))
    if config.local_disk:
        wanted.append((BACKENDS, "disk", "the disk tier"))
    if config.enable_p2p:
        wanted.append((BACKENDS, "p2p", "the p2p tier"))
        transport = config.p2p_transport
        wanted.append((TRANSPORTS, transport, f"the {transport} transport"))
    if config.remote_url and "://" in config.remote_url:
        scheme = urlparse(config.remote_url).scheme.lower()
        wanted.append((BACKENDS, scheme, f"the {scheme} tier"))
        serde = config.remote_serde
        wanted.append((SERDES, serde, f"the {serde} serde"))
    return wanted


def readers_in_use(config: CacheConfig) -> tuple[list[Reader], list[str], bool]:
    """The readers of ``extra_config`` this config uses, the problems loading them
    (a plugin written for another plugin API), and whether every one was loaded."""
    from lmcache_core.plugins import load_plugin

    readers = [Reader("the engine adapters", ENGINE_KEYS)]
    problems: list[str] = []
    complete = True
    for group, name, label in _wanted(config):
        try:
            cls = load_plugin(group, name)
        except PluginAPIError as e:
            problems.append(str(e))
            complete = False
            continue
        except Exception:  # not installed, or broken: reported by the other checks / the build
            complete = False
            continue
        readers.append(Reader(label, declared_keys(cls)))
    return readers, problems, complete


def _installed_readers() -> Iterator[Reader]:
    """Every installed plugin that declares ``extra_config`` keys (broken ones skipped)."""
    from lmcache_core.plugins import (
        BACKENDS,
        EVICTION_POLICIES,
        SERDES,
        TRANSPORTS,
        installed_names,
        load_plugin,
    )

    kinds = {
        BACKENDS: "tier",
        EVICTION_POLICIES: "eviction policy",
        SERDES: "serde",
        TRANSPORTS: "transport",
    }
    seen: set[int] = set()
    for group, kind in kinds.items():
        for name in installed_names(group):
            try:
                cls = load_plugin(group, name)
            except Exception:
                continue
            keys = declared_keys(cls)
            if keys and id(cls) not in seen:
                seen.add(id(cls))
                yield Reader(f"the {getattr(cls, 'name', name)} {kind}", keys)


def check_extra_config(config: CacheConfig, *, strict: bool, source: str) -> list[str]:
    """The problems of ``config.extra_config`` (errors); warnings are logged.

    ``strict``: unknown keys are errors (a file, overrides); else warnings
    (``LMCACHE_EXTRA_CONFIG``). ``source`` names where the config came from.
    """
    extra = config.extra_config
    if not extra:
        return []
    where = "extra_config" if strict else "LMCACHE_EXTRA_CONFIG"
    readers, problems, complete = readers_in_use(config)
    known = {k: r.label for r in reversed(readers) for k in r.keys}
    top = list(config.keys())
    upstream: list[str] = []
    unknown: list[str] = []
    for raw in extra:
        key = str(raw)
        if key in known:
            continue
        if key in SECRET_KEYS:
            problems.append(
                f"{where}.{key}: never put the secret in the cache config; set "
                "LMCACHE_AUTH_SECRET, or the top-level key auth_secret_file (a file only this "
                "service can read)"
            )
        elif key in UPSTREAM_EXTRA_KEYS or key.startswith(UPSTREAM_EXTRA_PREFIXES):
            upstream.append(key)
        else:
            unknown.append(key)
    if upstream:
        logger.warning(
            "%s: upstream LMCache extra_config keys that have no effect here (accepted): %s",
            source,
            ", ".join(sorted(upstream)),
        )
    if not unknown:
        return problems
    others = [r for r in _installed_readers() if r.label not in {x.label for x in readers}]
    elsewhere = {k: r.label for r in reversed(others) for k in r.keys}
    in_use = ", ".join(sorted(known)) or "none"
    for key in unknown:
        if key in elsewhere and key not in top:
            logger.warning(
                "%s: %s.%s has no effect: it is read by %s, which this config does not use",
                source,
                where,
                key,
                elsewhere[key],
            )
            continue
        if key in top:
            message = (
                f"{where}.{key} is a top-level key, not a plugin setting: move it out of "
                "extra_config"
            )
        else:
            candidates = sorted(known) + sorted(set(elsewhere) - set(known)) + top
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = ""
            if close and close[0] in top:
                hint = f"; did you mean the top-level key {close[0]!r}?"
            elif close:
                hint = f"; did you mean {close[0]!r}?"
            message = (
                f"{where}: unknown key {key!r}{hint} (the tiers in use and the engine read: "
                f"{in_use}; a plugin declares its keys in extra_config_keys)"
            )
        if strict and (complete or key in top):
            problems.append(message)
        elif not strict:
            logger.warning("%s: ignoring %s", source, message)
    return problems
