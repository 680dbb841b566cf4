"""Checks of a resolved config that span keys or the installed plugins, all reported at once."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcache_core.blend.selection import BUDGETS, parse_selection
from lmcache_core.sizes import MAX_SIZE

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig


@dataclass(frozen=True)
class Range:
    """Where a numeric key's value may lie: ``[low, high]`` (``(low, high]`` with ``open_low``)."""

    low: float
    high: float
    unit: str = ""
    open_low: bool = False

    def problem(self, key: str, value: float) -> str | None:
        """Why ``value`` is out of range for ``key`` (None: it is in range)."""
        if not isinstance(value, int) and not (isinstance(value, float) and math.isfinite(value)):
            return f"{key}={value!r} must be a finite number"
        below = value <= self.low if self.open_low else value < self.low
        if not below and value <= self.high:
            return None
        unit = f" {self.unit}" if self.unit else ""
        if self.open_low:
            return f"{key}={value!r} must be > {self.low:g} and at most {self.high:g}{unit}"
        return f"{key}={value!r} must be between {self.low:g} and {self.high:g}{unit}"


DAY = 86400.0
#: The range of every numeric key (a test checks each has one). Out of range values
#: were accepted and broke a tier later: ``blocking_timeout_secs=1e300`` overflowed the
#: Redis client's timeout, ``p2p_peer_ttl=1e-9`` made a 0 ms TTL Redis refuses.
RANGES: dict[str, Range] = {
    "chunk_size": Range(1, 1 << 20, "tokens"),
    "max_local_cpu_size": Range(0, MAX_SIZE - 1, "bytes"),
    "max_local_disk_size": Range(0, MAX_SIZE - 1, "bytes"),
    "write_behind_queue_size": Range(0, MAX_SIZE - 1, "bytes"),
    "server_slot_size": Range(0, 1 << 40, "bytes"),
    "max_chunk_aliases": Range(0, 1 << 24, "(0 turns it off)"),
    "pin_timeout": Range(0, DAY, "seconds", open_low=True),
    "blocking_timeout_secs": Range(0, 3600, "seconds", open_low=True),
    "tier_retry_backoff": Range(0, 3600, "seconds", open_low=True),
    "tier_retry_max_backoff": Range(0, DAY, "seconds", open_low=True),
    "p2p_peer_ttl": Range(1, 3600, "seconds (peers heartbeat at a third of it)"),
    "blend_min_tokens": Range(1, 1 << 24, "tokens"),
    "blend_deviation_target": Range(0, 1000),
    "blend_adaptive_min_ratio": Range(0, 1),
    "blend_adaptive_max_ratio": Range(0, 1),
    "blend_max_deviation": Range(0, 1000, "(0 turns the guard off)"),
    "server_timeout": Range(0, 3600, "seconds", open_low=True),
    "metrics_port": Range(0, 65535, "(a TCP port)"),
}
#: Each item of a list-valued numeric key.
ITEM_RANGES: dict[str, Range] = {
    "blend_check_layers": Range(0, 4096, "(layer numbers)"),
    "blend_recompute_ratios": Range(0, 1),
}
#: The kinds of config values that are numbers (and must each have a range).
NUMERIC_KINDS = ("int", "float", "size", "opt_int")
LIST_KINDS = ("int_list", "float_list")


def range_problems(self: CacheConfig) -> list[str]:
    """Each numeric key out of its range, by name."""
    p: list[str] = []
    for f in dataclasses.fields(self):
        value = getattr(self, f.name)
        if f.name in RANGES and value is not None:
            problem = RANGES[f.name].problem(f.name, value)
            if problem is not None:
                p.append(problem)
        elif f.name in ITEM_RANGES:
            bad = [x for x in value if ITEM_RANGES[f.name].problem(f.name, x) is not None]
            if bad:
                r = ITEM_RANGES[f.name]
                p.append(
                    f"{f.name}={list(value)} must lie in [{r.low:g}, {r.high:g}] {r.unit}".rstrip()
                )
    return p


#: Hash algorithms for chunk keys. sha256 and blake3 are cryptographic, so no
#: one can craft a collision to read or poison another tenant's KV; xxh3_128
#: is faster and only for deployments where every prompt is trusted.
HASH_ALGORITHMS = ("sha256", "blake3", "xxh3_128")


def config_problems(self: CacheConfig) -> list[str]:
    from lmcache_core.plugins import EVICTION_POLICIES, SERDES, installed_names

    p: list[str] = range_problems(self)
    if self.hash_algorithm not in HASH_ALGORITHMS:
        p.append(
            f"hash_algorithm={self.hash_algorithm!r} is not one of {', '.join(HASH_ALGORITHMS)}"
        )
    if self.tier_retry_max_backoff < self.tier_retry_backoff:
        p.append(
            f"tier_retry_max_backoff={self.tier_retry_max_backoff} must be >= "
            f"tier_retry_backoff={self.tier_retry_backoff}"
        )
    p.extend(_server_problems(self))
    policies = installed_names(EVICTION_POLICIES)
    if self.cache_policy.lower() not in policies:
        p.append(
            f"cache_policy={self.cache_policy!r} is not an installed eviction policy; "
            f"installed: {', '.join(sorted(policies))}"
        )
    serdes = installed_names(SERDES)
    if self.remote_serde.lower() not in serdes:
        p.append(
            f"remote_serde={self.remote_serde!r} is not an installed serde; "
            f"installed: {', '.join(sorted(serdes))}"
        )
    if self.local_disk is not None and "://" in self.local_disk:
        if not self.local_disk.startswith("file://"):
            p.append(f"local_disk={self.local_disk!r} must be a path or a file:///path/ URL")
    if self.local_disk is not None and self.max_local_disk_size == 0:
        p.append("local_disk is set but max_local_disk_size is 0; give it a size, e.g. 20GiB")
    if self.enable_p2p and not self.p2p_index_url:
        p.append("enable_p2p is set but p2p_index_url is not; e.g. redis://index-host:6379")
    p.extend(_blend_problems(self))
    p.extend(_remote_url_problems(self.remote_url))
    return p


def _blend_problems(self: CacheConfig) -> list[str]:
    p: list[str] = []
    layers, ratios = self.blend_check_layers, self.blend_recompute_ratios
    if len(layers) != len(ratios):
        p.append(
            f"blend_check_layers={list(layers)} and blend_recompute_ratios={list(ratios)} "
            "must have one ratio per check layer"
        )
    if any(b <= a for a, b in itertools.pairwise(layers)):
        p.append(f"blend_check_layers={list(layers)} must be increasing layer numbers >= 0")
    if any(not 0.0 <= r <= 1.0 for r in ratios):  # reported with the ranges
        pass
    elif any(b > a for a, b in itertools.pairwise(ratios)):
        p.append(
            f"blend_recompute_ratios={list(ratios)} must not grow from one check layer "
            "to the next (each keeps a subset of the tokens before it)"
        )
    try:
        parse_selection(self.blend_selection)
    except ValueError as e:
        p.append(str(e))
    if self.blend_budget not in BUDGETS:
        p.append(f"blend_budget={self.blend_budget!r}: one of {', '.join(BUDGETS)}")
    if self.blend_adaptive_min_ratio > self.blend_adaptive_max_ratio:
        p.append(
            f"blend_adaptive_min_ratio={self.blend_adaptive_min_ratio} is above "
            f"blend_adaptive_max_ratio={self.blend_adaptive_max_ratio}"
        )
    return p


#: Tiers that are not remote, named as a ``remote_url`` scheme: the key that means them.
_LOCAL_SCHEMES = {
    "cpu": "local_cpu",
    "disk": "local_disk",
    "file": "local_disk",
    "p2p": "enable_p2p",
}
#: Upstream LMCache's remote connectors that lmcache has no tier for.
_UPSTREAM_SCHEMES = {
    "lm": "upstream LMCache's lmcache_server, which lmcache does not serve; use redis://, "
    "s3:// or fs://",
    "resp": "upstream LMCache's RESP connector; use redis:// or valkey://",
    "redis-sentinel": "Redis Sentinel, not supported; point redis:// at the primary or use "
    "redis+cluster://",
    "infinistore": "InfiniStore, not supported",
    "mooncakestore": "Mooncake Store, not supported",
    "blackhole": "upstream LMCache's test connector; leave remote_url unset",
}


#: Upstream LMCache's serdes lmcache has none of: the tier stores frames with the default.
_UPSTREAM_SERDES = {"cachegen", "safetensor", "safetensors", "kivi"}
#: More of upstream LMCache's remote connectors (its examples and docs name them):
#: with those of :data:`_UPSTREAM_SCHEMES`, a fallback, not an error.
_UPSTREAM_FALLBACK_SCHEMES = {
    "mock": "upstream LMCache's test connector",
    "external": "upstream LMCache's external connector (a Python class it loads)",
    "bigtable": "Google Bigtable, not supported",
    "azure": "Azure Blob Storage, not supported",
    "eic": "Volcano Engine EIC, not supported",
    "sagemaker-hyperpod": "SageMaker HyperPod's cluster cache, not supported",
    "file": "upstream's file connector; lmcache's local disk tier is local_disk",
}


def upstream_fallbacks(values: dict[str, Any]) -> list[str]:
    """What upstream LMCache only warns about, made a fallback here (``values`` is changed):
    a ``remote_url`` of one of upstream's connectors lmcache has no tier for (``lm://``,
    ``mooncakestore://``, ``mock://``...) leaves the remote tier off; an upstream serde
    (``cachegen``...) lmcache has not is the default one. Returns the warnings, each with
    the key and what lmcache does instead. Any other scheme no installed tier serves (a
    typo, a tier of lmcache's not installed) is left for :func:`config_problems` to refuse."""
    said: list[str] = []
    url = values.get("remote_url")
    if isinstance(url, str) and "://" in url:
        scheme = url.split("://", 1)[0].lower()
        known = _UPSTREAM_SCHEMES.get(scheme) or _UPSTREAM_FALLBACK_SCHEMES.get(scheme)
        if known is not None and _remote_url_problems(url):
            said.append(
                f"remote_url={url!r}: {scheme}:// is {known}; lmcache runs without a remote "
                "tier (a shared store here is redis://, valkey://, s3:// or fs://)"
            )
            values["remote_url"] = None
    serde = values.get("remote_serde")
    if isinstance(serde, str) and serde.lower() in _missing_upstream_serdes():
        said.append(
            f"remote_serde={serde!r} is upstream LMCache's serde, which lmcache does not "
            "have; remote tiers store plain frames (naive)"
        )
        values.pop("remote_serde", None)
    return said


def _missing_upstream_serdes() -> set[str]:
    from lmcache_core.plugins import SERDES, installed_names

    return _UPSTREAM_SERDES - set(installed_names(SERDES))


def _remote_url_problems(url: str | None) -> list[str]:
    from lmcache_core.plugins import BACKENDS, KNOWN_PLUGINS, installed_names

    if url is None:
        return []
    if "://" not in url:
        return [f"remote_url={url!r} must be a URL such as redis://host:6379 or s3://bucket/prefix"]
    scheme = url.split("://", 1)[0].lower()
    if scheme in _LOCAL_SCHEMES:
        return [
            f"remote_url={url!r}: {scheme} is not a remote tier; set {_LOCAL_SCHEMES[scheme]} "
            "for it and remote_url for a shared store (redis://, s3://, fs://)"
        ]
    installed = installed_names(BACKENDS)
    if scheme in installed:
        return []
    if scheme in _UPSTREAM_SCHEMES:
        why = f"{scheme}:// is {_UPSTREAM_SCHEMES[scheme]}"
    elif scheme in KNOWN_PLUGINS[BACKENDS]:
        why = f"the {scheme} tier is not installed: {KNOWN_PLUGINS[BACKENDS][scheme]}"
    else:
        why = f"no installed tier serves {scheme}://"
    remote = [s for s in installed if s not in _LOCAL_SCHEMES]
    return [f"remote_url={url!r}: {why} (installed: {', '.join(remote)})"]


def _server_problems(self: CacheConfig) -> list[str]:
    """MP mode's keys: a server_url clients can parse, quotas that are sizes."""
    from lmcache_core.mp.address import parse_server_url
    from lmcache_core.sizes import parse_size

    p: list[str] = []
    if self.server_url is not None:
        try:
            parse_server_url(self.server_url)
        except ValueError as e:
            p.append(str(e))
    for salt, size in self.tenant_quotas.items():
        try:
            if isinstance(size, bool) or parse_size(size, what=f"tenant_quotas[{salt!r}]") < 0:
                raise ValueError
        except (ValueError, TypeError):
            p.append(f"tenant_quotas[{salt!r}]={size!r} must be a size such as 20GiB")
    return p
