"""The eviction policy protocol.

A policy only orders keys; the tier owns the data and decides what may be
evicted right now (a pinned or in-use chunk may not). The tier calls the
hooks under its own lock, so policies need no locking of their own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from typing import ClassVar

from lmcache_core.plugin_api import INHERITED_API_VERSION


class EvictionPolicy(ABC):
    """Orders the keys of one tier for eviction."""

    #: The name users give in ``cache_policy`` (matched case-insensitively).
    name: ClassVar[str]
    #: The plugin API this policy is written for (see :mod:`lmcache_core.plugin_api`).
    api_version: ClassVar[int] = INHERITED_API_VERSION
    #: The ``extra_config`` keys this policy reads: name -> one line on what it does.
    extra_config_keys: ClassVar[Mapping[str, str]] = {}

    @abstractmethod
    def on_insert(self, key: Hashable) -> None:
        """``key`` was stored. It is not tracked yet."""

    @abstractmethod
    def on_access(self, key: Hashable) -> None:
        """``key`` was read (a hit). It is tracked."""

    @abstractmethod
    def on_remove(self, key: Hashable) -> None:
        """``key`` was removed for another reason than eviction; forget it. It is tracked."""

    @abstractmethod
    def evict(self, is_evictable: Callable[[Hashable], bool]) -> Hashable | None:
        """Choose a victim for which ``is_evictable`` is true and stop tracking it.

        Returns None when no tracked key is evictable. The caller must then
        drop the victim's data.
        """

    @abstractmethod
    def __len__(self) -> int:
        """Number of tracked keys."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""
