"""Checks of a resolved config that span keys or the installed plugins, all reported at once."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcache_core.config import CacheConfig

#: Hash algorithms for chunk keys. sha256 and blake3 are cryptographic, so no
#: one can craft a collision to read or poison another tenant's KV; xxh3_128
#: is faster and only for deployments where every prompt is trusted.
HASH_ALGORITHMS = ("sha256", "blake3", "xxh3_128")


def config_problems(self: CacheConfig) -> list[str]:
    from lmcache_core.plugins import EVICTION_POLICIES, SERDES, installed_names

    p: list[str] = []
    if not 1 <= self.chunk_size <= 1 << 20:
        p.append(f"chunk_size={self.chunk_size} must be between 1 and {1 << 20} tokens")
    if self.hash_algorithm not in HASH_ALGORITHMS:
        p.append(
            f"hash_algorithm={self.hash_algorithm!r} is not one of {', '.join(HASH_ALGORITHMS)}"
        )
    if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
        p.append(f"metrics_port={self.metrics_port} must be a TCP port in [0, 65535]")
    if self.max_chunk_aliases < 0:
        p.append(f"max_chunk_aliases={self.max_chunk_aliases} must be >= 0 (0 turns it off)")
    if self.pin_timeout <= 0:
        p.append(f"pin_timeout={self.pin_timeout} must be > 0 seconds")
    if self.blocking_timeout_secs <= 0:
        p.append(f"blocking_timeout_secs={self.blocking_timeout_secs} must be > 0 seconds")
    if self.tier_retry_backoff <= 0:
        p.append(f"tier_retry_backoff={self.tier_retry_backoff} must be > 0 seconds")
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
    if self.p2p_peer_ttl <= 0:
        p.append(f"p2p_peer_ttl={self.p2p_peer_ttl} must be > 0 seconds")
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
    if any(b <= a for a, b in itertools.pairwise(layers)) or any(x < 0 for x in layers):
        p.append(f"blend_check_layers={list(layers)} must be increasing layer numbers >= 0")
    if any(not 0.0 <= r <= 1.0 for r in ratios):  # NaN fails this too
        p.append(f"blend_recompute_ratios={list(ratios)} must lie in [0, 1]")
    elif any(b > a for a, b in itertools.pairwise(ratios)):
        p.append(
            f"blend_recompute_ratios={list(ratios)} must not grow from one check layer "
            "to the next (each keeps a subset of the tokens before it)"
        )
    if self.blend_min_tokens < 1:
        p.append(f"blend_min_tokens={self.blend_min_tokens} must be >= 1")
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
    if not 0 < self.server_timeout <= 3600:
        p.append(f"server_timeout={self.server_timeout} must be in (0, 3600] seconds")
    if self.server_slot_size < 0:
        p.append(f"server_slot_size={self.server_slot_size} must be >= 0 (0: the first engine's)")
    for salt, size in self.tenant_quotas.items():
        try:
            if isinstance(size, bool) or parse_size(size, what=f"tenant_quotas[{salt!r}]") < 0:
                raise ValueError
        except (ValueError, TypeError):
            p.append(f"tenant_quotas[{salt!r}]={size!r} must be a size such as 20GiB")
    return p
