"""Which kind of tier a lookup's hits come from, for the engine's own metrics.

vLLM 0.32 counts cached prompt tokens by source (``vllm:prompt_tokens_cached_by_source``:
device, host, disk, p2p, external_unspecified) and asks the connector to split
its hits that way when it admits a request, before anything is loaded. The
lookup has just found the chunks; this says where, without another round trip
to a remote store: the DRAM tier and a local disk tier answer from memory, and
a chunk neither holds came from the one remote kind configured, or is
``remote`` when several are (a peer or Redis: the lookup does not say which).

The names are engine-agnostic; an adapter maps them to its engine's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmcache_core.keys import CacheKey
    from lmcache_core.tier_cascade import TierCascade

HOST, DISK, P2P, REMOTE = "host", "disk", "p2p", "remote"
#: Every kind, from nearest to farthest (a chunk several ranks hold counts as the farthest).
KINDS = (HOST, DISK, P2P, REMOTE)
#: Tiers in this process's memory or on its own disk, by name: they answer locally.
_LOCAL_KINDS = {"cpu": HOST, "disk": DISK}
#: Owners whose last lookup is remembered, at most (a request forgets its at unpin).
MAX_OWNERS = 4096


def classify(cascade: TierCascade, keys: Sequence[CacheKey]) -> list[str]:
    """The kind of tier holding each of ``keys`` (keys a lookup just found)."""
    out: list[str | None] = [None] * len(keys)
    remote_kinds = set()
    for tier in cascade.tiers:
        kind = _LOCAL_KINDS.get(tier.name)
        if kind is None:
            remote_kinds.add(P2P if tier.name == "p2p" else REMOTE)
            continue
        idx = [i for i, k in enumerate(out) if k is None]
        if not idx:
            break
        try:
            found = tier.contains([keys[i] for i in idx])
        except Exception:  # a broken tier answers nothing; the chunk counts as remote
            continue
        for i, ok in zip(idx, found):
            if ok:
                out[i] = kind
    rest = remote_kinds.pop() if len(remote_kinds) == 1 else REMOTE
    return [k if k is not None else rest for k in out]


class HeldByOwner:
    """The keys each owner's last lookup found (what it will load), bounded."""

    def __init__(self, max_owners: int = MAX_OWNERS) -> None:
        self._keys: OrderedDict[str, list[CacheKey]] = OrderedDict()
        self._max = max_owners

    def record(self, owner: str, keys: list[CacheKey]) -> None:
        self._keys[owner] = keys
        self._keys.move_to_end(owner)
        while len(self._keys) > self._max:
            self._keys.popitem(last=False)

    def forget(self, owner: str) -> None:
        self._keys.pop(owner, None)

    def get(self, owner: str) -> list[CacheKey]:
        return self._keys.get(owner, [])
