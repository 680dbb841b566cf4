"""The transport protocol: moving chunk bytes between the arenas of two processes.

A transport (NIXL in ``lmcache-nixl``; a third party's, e.g. Mooncake's
transfer engine, through the ``lmcache.transports`` entry points) registers
this process's arena once, publishes what peers need to reach it
(``metadata``), and pulls bytes from a peer's registered memory into its
own in batches (``read``). It knows nothing of keys or indexes: the
peer-to-peer tier (``lmcache_core.backends.p2p``) does that on top.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from lmcache_core.arena import Arena
from lmcache_core.errors import LMCacheError
from lmcache_core.plugin_api import INHERITED_API_VERSION


class TransportError(LMCacheError):
    """A transfer failed or timed out; the caller treats its chunks as misses.

    ``in_flight`` says the transfer may still be writing into the local
    regions (a timeout): their memory must not be reused.
    """

    def __init__(self, message: str, *, in_flight: bool = False) -> None:
        super().__init__(message)
        self.in_flight = in_flight


@dataclass(frozen=True)
class Region:
    """``nbytes`` at ``address`` in some process's registered memory."""

    address: int
    nbytes: int


class Transport(ABC):
    name: ClassVar[str]
    #: The plugin API this transport is written for (see :mod:`lmcache_core.plugin_api`).
    api_version: ClassVar[int] = INHERITED_API_VERSION
    #: The ``extra_config`` keys this transport reads: name -> one line on what it does.
    extra_config_keys: ClassVar[Mapping[str, str]] = {}

    @property
    @abstractmethod
    def peer_id(self) -> str:
        """This process's name among peers (unique in the cluster)."""

    @abstractmethod
    def register(self, arena: Arena) -> None:
        """Make ``arena`` readable by peers (and writable by this process's reads)."""

    @abstractmethod
    def metadata(self) -> bytes:
        """What a peer needs to ``connect`` to this process; published in the index."""

    @abstractmethod
    def connect(self, metadata: bytes) -> str:
        """Learn a peer from its metadata; returns its peer id. Idempotent."""

    @abstractmethod
    def read(self, peer: str, pairs: Sequence[tuple[Region, Region]], *, timeout: float) -> None:
        """Copy each ``(local, remote)`` pair from ``peer`` into local memory, as one batch.

        Raises :class:`TransportError` on failure or after ``timeout`` seconds;
        local regions may then hold partial bytes.
        """

    def disconnect(self, peer: str) -> None:  # noqa: B027 - optional
        """Forget ``peer`` (it died, or its metadata changed)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release resources. Idempotent."""
