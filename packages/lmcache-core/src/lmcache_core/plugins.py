"""Plugin discovery through entry points.

Backends, eviction policies and serdes are found by name in entry-point
groups; the built-ins register the same way a third party does, so
``pip install lmcache-foo`` is all it takes to add one. Names are matched
case-insensitively (LMCache users write ``cache_policy: LRU``).

A name that is known but not installed fails with the package to install, as
fsspec does for its protocols. A plugin written for a plugin API this
lmcache-core does not serve (:mod:`lmcache_core.plugin_api`) fails here, when
it is loaded, with its name and what changed.
"""

from __future__ import annotations

import difflib
import functools
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from lmcache_core.errors import PluginAPIError, PluginNotFoundError
from lmcache_core.plugin_api import check_api_version, declared_api_version

BACKENDS = "lmcache.backends"
EVICTION_POLICIES = "lmcache.eviction_policies"
SERDES = "lmcache.serdes"
TRANSPORTS = "lmcache.transports"
#: Host-memory transfer implementations: ``cls(layout, layers, block_table)``
#: returning a KVReader/KVWriter (lmcache-cuda registers its C kernels as "c").
TRANSFERS = "lmcache.transfers"
#: ``lmcache <name>`` subcommands other packages add: ``main(argv) -> exit status``
#: (lmcache-server registers ``server``), so core's CLI imports none of them.
COMMANDS = "lmcache.commands"

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
    COMMANDS: {
        "server": "pip install 'lmcache[server]' (from this repository: pip install "
        "./packages/lmcache-server)"
    },
}


def command(name: str) -> Any | None:
    """The ``main(argv)`` of subcommand ``name`` from an installed package, or None."""
    ep = _entry_points(COMMANDS).get(name)
    return ep.load() if ep is not None else None


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
        ep = eps[key]
        try:
            obj = ep.load()
        except PluginAPIError as e:  # raised as the plugin's class was made
            raise PluginAPIError(f"{_describe(group, name, ep)}: {e}") from None
        if isinstance(obj, type) and declared_api_version(obj) is not None:
            check_api_version(obj, _describe(group, name, ep))
        return obj
    installed = ", ".join(sorted(eps)) or "none"
    hint = KNOWN_PLUGINS.get(group, {}).get(key)
    if hint:
        msg = f"{group} plugin {name!r} is not installed: {hint}. Installed: {installed}"
    else:
        close = difflib.get_close_matches(key, list(eps), n=1)
        guess = f" Did you mean {close[0]!r}?" if close else ""
        msg = f"no {group} plugin named {name!r}; installed: {installed}.{guess}"
    raise PluginNotFoundError(msg)


def _describe(group: str, name: str, ep: EntryPoint) -> str:
    """The plugin as a message names it: group, name, object, distribution."""
    dist = getattr(ep, "dist", None)
    where = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"{group} plugin {name!r} ({ep.value}{where})"


def refresh() -> None:
    """Forget cached entry points (after installing a plugin in a running process)."""
    _entry_points.cache_clear()
