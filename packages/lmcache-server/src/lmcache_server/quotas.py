"""Per-tenant byte quotas on the server's DRAM tier.

A tenant is a ``cache_salt`` (vLLM's per-request salt, SGLang's extra key):
tenants never share KV (the salt is in every key), and with quotas one
tenant's traffic cannot push every other tenant's chunks out of DRAM either.
Upstream LMCache's coordinator has per-salt quotas on its lower tiers; this
is the same promise for the tier that matters most for TTFT.

Config (``tenant_quotas``)::

    tenant_quotas:
      "team-a-salt": 20GiB     # this salt's chunks use at most 20 GiB of DRAM
      "*": 4GiB                # every other salted tenant, each
      "": 8GiB                 # requests without a salt

Salts never cross the wire: a client sends a digest of its salt
(:func:`tenant_id`), the server digests the salts of its config the same way.
When a store would take a tenant past its quota, that tenant's own least
recently stored or read chunks are evicted first; if they are pinned or being
read, the store is skipped (counted), never another tenant's chunks.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lmcache_core.request_options import tenant_id
from lmcache_core.sizes import format_size, parse_size

if TYPE_CHECKING:
    from lmcache_core.backends.cpu import LocalCPUBackend
    from lmcache_core.cache_key import CacheKey
    from lmcache_core.config import CacheConfig

logger = logging.getLogger(__name__)

#: The quota key for every salted tenant without an entry of its own.
ANY_TENANT = "*"


class TenantQuotas:
    """Bytes of DRAM each tenant holds, and the quotas that bound them."""

    def __init__(self, quotas: Mapping[str, int]) -> None:
        self._default = quotas.get(ANY_TENANT)
        self._quota = {tenant_id(salt): int(v) for salt, v in quotas.items() if salt != ANY_TENANT}
        self._names = {
            tenant_id(salt): (salt or "(no salt)") for salt in quotas if salt != ANY_TENANT
        }
        self._lock = threading.Lock()
        #: tenant -> key -> bytes, least recently used first (only tenants with a quota).
        self._chunks: dict[str, OrderedDict[CacheKey, int]] = {}
        self._owner: dict[CacheKey, str] = {}
        self._used: dict[str, int] = {}
        self._cpu: LocalCPUBackend | None = None

    @classmethod
    def from_config(cls, config: CacheConfig) -> TenantQuotas:
        raw = getattr(config, "tenant_quotas", None) or {}
        return cls(
            {str(k): parse_size(v) if isinstance(v, str) else int(v) for k, v in raw.items()}
        )

    @property
    def enabled(self) -> bool:
        return bool(self._quota) or self._default is not None

    def attach(self, cpu: LocalCPUBackend) -> None:
        self._cpu = cpu

    def quota(self, tenant: str) -> int | None:
        q = self._quota.get(tenant)
        if q is None and tenant:
            q = self._default
        return q

    # ------------------------------------------------------------------ accounting

    def make_room(self, tenant: str, nbytes: int) -> bool:
        """Before a store of ``nbytes`` for ``tenant``: evict its own chunks past its quota.

        False when the tenant's quota cannot hold it (its chunks are in use).
        """
        q = self.quota(tenant)
        if q is None:
            return True
        if nbytes > q:
            return False
        victims: list[CacheKey] = []
        with self._lock:
            used = self._used.get(tenant, 0)
            chunks = self._chunks.get(tenant, OrderedDict())
            for key, size in chunks.items():
                if used + nbytes <= q:
                    break
                victims.append(key)
                used -= size
        if victims and self._cpu is not None:
            self._cpu.evict_keys(victims)
            for key in victims:
                self.forget(key)
        with self._lock:
            return self._used.get(tenant, 0) + nbytes <= q

    def stored(self, tenant: str, keys: list[tuple[CacheKey, int]]) -> None:
        """``keys`` (with their sizes) entered DRAM for ``tenant``."""
        if self.quota(tenant) is None:
            return
        with self._lock:
            chunks = self._chunks.setdefault(tenant, OrderedDict())
            for key, size in keys:
                if key in self._owner:
                    continue
                chunks[key] = size
                self._owner[key] = tenant
                self._used[tenant] = self._used.get(tenant, 0) + size

    def touched(self, keys: list[CacheKey]) -> None:
        with self._lock:
            for key in keys:
                t = self._owner.get(key)
                if t is not None:
                    self._chunks[t].move_to_end(key)

    def forget(self, key: CacheKey) -> None:
        """``key`` left DRAM (evicted, removed)."""
        with self._lock:
            t = self._owner.pop(key, None)
            if t is None:
                return
            size = self._chunks[t].pop(key, 0)
            self._used[t] = self._used.get(t, 0) - size

    def set_quota(self, salt: str, nbytes: int | None) -> bool:
        """Set (or, with None, remove) ``salt``'s quota at run time; False if it had none.

        A lowered quota takes effect at the tenant's next store."""
        t = tenant_id(salt)
        with self._lock:
            had = t in self._quota
            if nbytes is None:
                self._quota.pop(t, None)
            else:
                self._quota[t] = int(nbytes)
                self._names[t] = salt or "(no salt)"
        return had

    def describe(self, salt: str) -> dict[str, Any]:
        """Upstream's ``GET /quota/{cache_salt}`` shape."""
        t = tenant_id(salt)
        q = self.quota(t)
        with self._lock:
            used = self._used.get(t, 0)
        return {
            "cache_salt": salt,
            "limit_gb": None if q is None else q / 2**30,
            "current_usage_gb": used / 2**30,
            "exists": t in self._quota,
        }

    def by_salt(self) -> dict[str, dict[str, Any]]:
        """Upstream's ``GET /quota`` users map (salts the server was told about)."""
        with self._lock:
            names = dict(self._names)
        out = {}
        for name in names.values():
            d = self.describe("" if name == "(no salt)" else name)
            out[name] = {"limit_gb": d["limit_gb"], "current_usage_gb": d["current_usage_gb"]}
        return out

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "tenant": self._names.get(t, t[:12]),
                    "used_bytes": used,
                    "quota_bytes": self.quota(t),
                    "quota": format_size(self.quota(t) or 0),
                }
                for t, used in sorted(self._used.items())
            ]
