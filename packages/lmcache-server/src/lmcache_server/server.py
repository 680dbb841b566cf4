"""``CacheServer``: the listening sockets, the sessions, the admin endpoint.

Control plane: a Unix socket (always; the arena's descriptor travels over it)
and, optionally, TCP for clients on this host that cannot reach the socket
(another network namespace with ``hostIPC``; they open the arena by its
``shm_name``). Over TCP every client must prove the deployment secret
(challenge and HMAC at HELLO); without a secret the server does not listen on
TCP at all, and says how to reach it instead.

The Unix socket is made in a directory private to the server's user unless a
path is given; its file mode is ``socket_mode`` (0660: the user and group
that run the engines). Anything that can connect is trusted with the arena
(it maps it read-write): run one server per trust domain, and isolate
tenants by key (``cache_salt``), as the engines do.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import threading
import time
from typing import Any

from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
from lmcache_core.metrics import Metrics
from lmcache_core.mp.address import is_loopback, make_socket_dir

from lmcache_server.namespaces import NamespaceRegistry
from lmcache_server.session import Session
from lmcache_server.version import __version__

logger = logging.getLogger(__name__)


class CacheServer:
    """One host's cache, served to every engine on it."""

    def __init__(
        self,
        config: CacheConfig,
        *,
        socket_path: str,
        tcp_host: str | None = None,
        tcp_port: int | None = None,
        shm_name: str | None = None,
        admin_host: str = "127.0.0.1",
        admin_port: int | None = None,
        socket_mode: int = 0o660,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.version = __version__
        self.metrics = metrics if metrics is not None else Metrics()
        self.socket_path = socket_path
        self.socket_mode = socket_mode
        self.handshake_timeout = 10.0
        self.stopping = False
        self.started = time.time()
        self._lock = threading.Lock()
        self._sessions: dict[int, Session] = {}
        self._next_id = 0
        self._threads: list[threading.Thread] = []
        self._listeners: list[socket.socket] = []
        self.admin: Any = None
        self.registry = NamespaceRegistry(config, self.metrics, shm_name=shm_name)
        self.metrics.declare(tier=["cpu"])  # lower tiers' series come with each namespace
        try:
            if tcp_port is not None and self.registry.secret is None:
                raise ConfigError(
                    [
                        f"listening on TCP {tcp_host}:{tcp_port} needs the deployment secret "
                        "(LMCACHE_AUTH_SECRET or auth_secret_file): anyone who reaches the port "
                        f"could read and write this host's KV. Clients on this host connect "
                        f"through the Unix socket {socket_path} without one"
                    ]
                )
            if tcp_port is not None and not shm_name:
                raise ConfigError(
                    [
                        "TCP clients open the arena by name: set shm_name (--shm-name) as well, "
                        "or let clients on this host use the Unix socket"
                    ]
                )
            self._listen_unix(socket_path)
            if tcp_port is not None:
                self._listen_tcp(tcp_host or "127.0.0.1", tcp_port)
            if admin_port is not None:
                from lmcache_server.admin import start_admin

                self.admin = start_admin(self, admin_host, admin_port)
        except BaseException:
            self.close(0)
            raise

    # ------------------------------------------------------------------ listening

    def _listen_unix(self, path: str) -> None:
        make_socket_dir(os.path.dirname(path) or "/")
        if os.path.lexists(path):
            st = os.lstat(path)
            if not stat.S_ISSOCK(st.st_mode):
                raise ConfigError([f"{path} exists and is not a socket; remove it or pick another"])
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                    raise
                os.unlink(path)  # a dead server's socket
            else:
                raise ConfigError([f"another lmcache server is listening on {path}"])
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~self.socket_mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, self.socket_mode)
        sock.listen(128)
        self._listeners.append(sock)
        self._start(self._accept, sock, True)
        logger.info("lmcache server: listening on unix://%s", path)

    def _listen_tcp(self, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        self._listeners.append(sock)
        self._start(self._accept, sock, False)
        where = "loopback" if is_loopback(host) else "the network"
        logger.info(
            "lmcache server: listening on tcp://%s:%d (%s, secret required)", host, port, where
        )

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        for s in self._listeners:
            if s.family != socket.AF_UNIX:
                return s.getsockname()[:2]
        return None

    def _start(self, target: Any, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True, name="lmcache-server")
        t.start()
        self._threads.append(t)
        return t

    def _accept(self, listener: socket.socket, is_unix: bool) -> None:
        while not self.stopping:
            try:
                sock, addr = listener.accept()
            except OSError:
                if self.stopping:
                    return
                time.sleep(0.05)
                continue
            if not is_unix:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = _peer(sock, addr, is_unix)
            session = Session(self, sock, is_unix=is_unix, peer=peer)
            with self._lock:
                self._sessions[session.id] = session
            self.metrics.set("lmcache:server_sessions", len(self._sessions))
            threading.Thread(target=session.run, daemon=True, name=f"lmcache-s{session.id}").start()

    def next_session_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def session_closed(self, session: Session) -> None:
        with self._lock:
            self._sessions.pop(session.id, None)
            n = len(self._sessions)
        self.metrics.set("lmcache:server_sessions", n)

    # ------------------------------------------------------------------ admin

    def about(self) -> dict[str, Any]:
        """What the server tells a client before HELLO: the settings a client must share
        (upstream's connector asks the server for its chunk size)."""
        return {
            "server_version": self.version,
            "chunk_size": self.config.chunk_size,
            "hash_algorithm": self.config.hash_algorithm,
        }

    def status(self) -> dict[str, Any]:
        with self._lock:
            sessions = [
                {"id": s.id, "peer": s.peer, "leases": len(s._leases)}
                for s in self._sessions.values()
            ]
        return {
            "version": self.version,
            "uptime_s": round(time.time() - self.started, 1),
            "socket": self.socket_path,
            "tcp": self.tcp_address,
            "sessions": sessions,
            **self.registry.status(),
        }

    def registry_for_metrics(self) -> Any:
        """A Prometheus registry of the server's metrics and its process (memory, CPU)."""
        from lmcache_core.metrics import registry_for
        from prometheus_client import ProcessCollector

        registry = registry_for(self.metrics)
        ProcessCollector(registry=registry)
        return registry

    def clear(self) -> int:
        n = self.registry.clear()
        logger.info("lmcache server: cleared %d chunks from DRAM", n)
        return n

    # ------------------------------------------------------------------ stop

    def serve_forever(self) -> None:
        while not self.stopping:
            time.sleep(0.5)

    def close(self, timeout: float | None = None) -> None:
        """Stop listening, end every session, write what lower tiers have queued."""
        if timeout is None:
            timeout = self.config.blocking_timeout_secs
        self.stopping = True
        for s in self._listeners:
            try:
                s.close()
            except OSError:
                pass
        self._listeners = []
        if self.admin is not None:
            self.admin.shutdown()
            self.admin = None
        with self._lock:
            sessions = list(self._sessions.values())
        for session in sessions:
            try:
                session.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            session.close()
        try:
            if os.path.exists(self.socket_path) and stat.S_ISSOCK(
                os.lstat(self.socket_path).st_mode
            ):
                os.unlink(self.socket_path)
        except OSError:
            pass
        self.registry.close(timeout)
        logger.info("lmcache server: stopped")

    def __enter__(self) -> CacheServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _peer(sock: socket.socket, addr: Any, is_unix: bool) -> str:
    if not is_unix:
        return f"{addr[0]}:{addr[1]}"
    try:
        import struct

        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"pid {pid} uid {uid}"
    except OSError:
        return "unix"
