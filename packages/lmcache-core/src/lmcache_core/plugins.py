"""Plugin discovery through entry points.

Backends, eviction policies and serdes are found by name in entry-point
groups; the built-ins register the same way a third party does, so
``pip install lmcache-foo`` is all it takes to add one. Names are matched
case-insensitively (LMCache users write ``cache_policy: LRU``).

A name that is known but not installed fails with the package to install, as
fsspec does for its protocols.
"""

from __future__ import annotations

import difflib
import functools
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from lmcache_core.errors import PluginNotFoundError

BACKENDS = "lmcache.backends"
EVICTION_POLICIES = "lmcache.eviction_policies"
SERDES = "lmcache.serdes"
TRANSPORTS = "lmcache.transports"
#: Host-memory transfer implementations: ``cls(layout, layers, block_table)``
#: returning a KVReader/KVWriter (lmcache-cuda registers its C kernels as "c").
TRANSFERS = "lmcache.transfers"

GROUPS = (BACKENDS, EVICTION_POLICIES, SERDES, TRANSPORTS, TRANSFERS)

#: Names we know of, with what to install to get them.
KNOWN_PLUGINS: dict[str, dict[str, str]] = {
    BACKENDS: {
        "nixl": "pip install 'lmcache[nixl]' (NIXL storage and peer-to-peer tiers)",
    },
    SERDES: {
        "zstd": "pip install 'lmcache[compression]' (zstd serde for remote tiers)",
        "lz4": "pip install 'lmcache[compression]' (lz4 serde for remote tiers)",
    },
    EVICTION_POLICIES: {},
    TRANSPORTS: {"nixl": "pip install 'lmcache[nixl]'"},
    TRANSFERS: {"c": "pip install 'lmcache[cuda]' (C transfer kernels)"},
}


@functools.cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=group):
        found.setdefault(ep.name.lower(), ep)
    return found


def installed_names(group: str) -> list[str]:
    """Names of the plugins installed in ``group``, lower case."""
    return sorted(_entry_points(group))


def load_plugin(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group`` (usually a class)."""
    eps = _entry_points(group)
    key = name.lower()
    if key in eps:
        return eps[key].load()
    installed = ", ".join(sorted(eps)) or "none"
    hint = KNOWN_PLUGINS.get(group, {}).get(key)
    if hint:
        msg = f"{group} plugin {name!r} is not installed: {hint}. Installed: {installed}"
    else:
        close = difflib.get_close_matches(key, list(eps), n=1)
        guess = f" Did you mean {close[0]!r}?" if close else ""
        msg = f"no {group} plugin named {name!r}; installed: {installed}.{guess}"
    raise PluginNotFoundError(msg)


def refresh() -> None:
    """Forget cached entry points (after installing a plugin in a running process)."""
    _entry_points.cache_clear()
