"""``NixlTransport``: lmcache-core's transport protocol over a NIXL agent.

One agent per cache engine (process, TP rank), named uniquely; the cache
arena is registered once as DRAM (or VRAM for a GPU arena). A read is one
NIXL READ request for a whole batch of chunks, polled to completion with a
deadline, so a dead peer costs a timeout and a miss, never a hang.
UCX picks the data path: shared memory between processes on one host, RDMA
or TCP across hosts.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence

from lmcache_core.arena import Arena
from lmcache_core.transport import Region, Transport, TransportError

logger = logging.getLogger(__name__)


def _import_nixl():  # type: ignore[no-untyped-def]
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise TransportError(
            f"the NIXL transport needs the nixl package ({e}): pip install 'lmcache[nixl]'"
        ) from None
    return nixl_agent, nixl_agent_config


#: Microseconds NIXL's progress thread waits for events when it has no work
#: (``LMCACHE_NIXL_PROGRESS_DELAY_US``). nixl's Python API hard-codes 0, and
#: then (measured, nixl 1.5.1) the UCX backend's progress thread spins a whole
#: core while the agent is idle: an idle vLLM instance with the p2p tier burnt a
#: core, and on a 2-core host a second instance beside it took 8 minutes to
#: start. 100 us: 2% of a core idle, and no change in pull throughput
#: (docs/benchmarks.md). Without a progress thread reads never completed (the
#: owner's side must progress too), so the thread stays, just not spinning.
PROGRESS_DELAY_US = 100

_AGENT_LOCK = threading.Lock()


def _agent_with_progress_delay(nixl_agent, name: str, config):  # type: ignore[no-untyped-def]
    """``nixl_agent(name, config)`` with the progress thread's delay set (see above)."""
    import nixl._api as api

    delay = int(os.environ.get("LMCACHE_NIXL_PROGRESS_DELAY_US", PROGRESS_DELAY_US))
    bind = getattr(api, "nixlBind", None)
    if bind is None or not hasattr(bind, "nixlAgent"):  # another nixl: its own defaults
        return nixl_agent(name, config)
    original = bind.nixlAgent

    def make(agent_name, agent_config):  # type: ignore[no-untyped-def]
        agent_config.pthrDelay = delay
        return original(agent_name, agent_config)

    with _AGENT_LOCK:  # the wrapper is visible to this construction only
        bind.nixlAgent = make
        try:
            return nixl_agent(name, config)
        finally:
            bind.nixlAgent = original


class NixlTransport(Transport):
    name = "nixl"

    def __init__(self, name: str | None = None, *, backends: Sequence[str] = ("UCX",)) -> None:
        nixl_agent, nixl_agent_config = _import_nixl()
        self._name = name or f"lmcache-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.agent = _agent_with_progress_delay(
            nixl_agent, self._name, nixl_agent_config(backends=list(backends))
        )
        self._lock = threading.Lock()
        self._peers: dict[str, bytes] = {}
        self._registered: list[object] = []
        self.mem_type = "DRAM"

    @property
    def peer_id(self) -> str:
        return self._name

    def register(self, arena: Arena) -> None:
        descs = self.agent.register_memory([(arena.address, arena.size, 0, "")], self.mem_type)
        self._registered.append(descs)

    def metadata(self) -> bytes:
        return bytes(self.agent.get_agent_metadata())

    def connect(self, metadata: bytes) -> str:
        with self._lock:
            for peer, md in self._peers.items():
                if md == metadata:
                    return peer
            try:
                peer = self.agent.add_remote_agent(metadata)
            except Exception as e:
                raise TransportError(f"peer metadata rejected by NIXL: {e}") from None
            if isinstance(peer, bytes):
                peer = peer.decode()
            self._peers[peer] = metadata
            return peer

    def read(self, peer: str, pairs: Sequence[tuple[Region, Region]], *, timeout: float) -> None:
        self.finish_read(self.start_read(peer, pairs), timeout=timeout)

    def start_read(self, peer: str, pairs: Sequence[tuple[Region, Region]]) -> object:
        if not pairs:
            return None
        if peer not in self._peers:
            raise TransportError(f"unknown peer {peer!r}: connect() to it first")
        mem = self.mem_type
        local = self.agent.get_xfer_descs([(r.address, r.nbytes, 0) for r, _ in pairs], mem)
        remote = self.agent.get_xfer_descs([(r.address, r.nbytes, 0) for _, r in pairs], mem)
        try:
            handle = self.agent.initialize_xfer("READ", local, remote, peer)
        except Exception as e:
            raise TransportError(f"NIXL could not start a read from {peer}: {e}") from None
        try:
            state = self.agent.transfer(handle)
        except Exception as e:
            self._release(handle)
            raise TransportError(f"NIXL read from {peer} failed to post: {e}") from None
        if state == "ERR":
            self._release(handle)
            raise TransportError(f"NIXL read from {peer} failed")
        return (peer, handle)

    def finish_read(self, handle: object, *, timeout: float) -> None:
        if handle is None:
            return
        peer, h = handle  # type: ignore[misc]
        try:
            deadline = time.monotonic() + timeout
            state = self.agent.check_xfer_state(h)
            while state not in ("DONE", "ERR"):
                if time.monotonic() > deadline:
                    raise TransportError(
                        f"read from {peer} timed out after {timeout} s", in_flight=True
                    )
                time.sleep(0)  # UCX's progress thread moves the bytes
                state = self.agent.check_xfer_state(h)
            if state == "ERR":
                raise TransportError(f"NIXL read from {peer} failed")
        finally:
            self._release(h)

    def _release(self, handle: object) -> None:
        try:
            self.agent.release_xfer_handle(handle)
        except Exception:  # a handle of a dead peer may not release cleanly
            logger.debug("releasing a NIXL handle failed", exc_info=True)

    def disconnect(self, peer: str) -> None:
        with self._lock:
            if self._peers.pop(peer, None) is not None:
                try:
                    self.agent.remove_remote_agent(peer)
                except Exception:
                    logger.debug("removing NIXL peer %s failed", peer, exc_info=True)

    def close(self) -> None:
        for peer in list(self._peers):
            self.disconnect(peer)
        for descs in self._registered:
            try:
                self.agent.deregister_memory(descs)
            except Exception:
                logger.debug("deregistering memory failed", exc_info=True)
        self._registered.clear()
