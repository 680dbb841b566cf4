"""Where an ``lmcache server`` listens, as clients and the server both name it.

``server_url`` forms:

* ``unix:///run/lmcache/lmcache.sock`` (or a bare absolute path): the Unix
  socket, the default and the only way to get the shared arena by descriptor;
* ``tcp://HOST:PORT``: upstream LMCache's form (``lmcache.mp.host`` and
  ``lmcache.mp.port``). A loopback host means *this* host, so the client uses
  the server's local socket for that port (:func:`local_socket_for_port`):
  upstream's documented ``tcp://localhost:5555`` works unchanged, with no
  secret and no TCP listener. Any other host is a real TCP connection, which
  the server accepts only with the deployment secret.

Why the local socket lives in a per-user directory (``/tmp/lmcache-<uid>/``,
or ``LMCACHE_SOCKET_DIR``): a name in a world-writable directory could be
taken first by another local user, who would then receive the engine's KV.
The directory is made private (0700) by the server, and a client refuses
one that another user can write to.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from urllib.parse import urlparse

SOCKET_DIR_ENV = "LMCACHE_SOCKET_DIR"
#: Upstream's default port for ``lmcache server``.
DEFAULT_PORT = 5555


@dataclass(frozen=True)
class ServerAddress:
    """A parsed ``server_url``: a Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path else f"tcp://{self.host}:{self.port}"


def parse_server_url(url: str) -> ServerAddress:
    """A ``server_url`` as a :class:`ServerAddress`; ValueError saying what is wrong."""
    text = str(url).strip()
    if not text or "\0" in text:
        raise ValueError(f"server_url={url!r} is empty or has a NUL byte")
    if text.startswith("/"):
        return ServerAddress(path=text)
    parsed = urlparse(text)
    if parsed.scheme == "unix":
        path = (parsed.netloc + parsed.path) if parsed.netloc else parsed.path
        if not path.startswith("/"):
            raise ValueError(f"server_url={url!r}: write unix:///absolute/path.sock")
        return ServerAddress(path=path)
    if parsed.scheme == "tcp":
        host = parsed.hostname
        try:
            port = parsed.port if parsed.port is not None else DEFAULT_PORT
        except ValueError:
            raise ValueError(f"server_url={url!r}: the port must be 1-65535") from None
        if not host:
            raise ValueError(f"server_url={url!r}: write tcp://HOST:PORT")
        if is_loopback(host):
            return ServerAddress(path=local_socket_for_port(port), host=host, port=port)
        return ServerAddress(host=host, port=port)
    raise ValueError(
        f"server_url={url!r}: use unix:///path/to/lmcache.sock (this host) or tcp://HOST:PORT"
    )


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def socket_dir() -> str:
    """The directory of the local sockets named by port (private to this user)."""
    return os.environ.get(SOCKET_DIR_ENV) or f"/tmp/lmcache-{os.getuid()}"


def local_socket_for_port(port: int) -> str:
    """The Unix socket a server started with ``--port PORT`` listens on for local clients."""
    return os.path.join(socket_dir(), f"lmcache-{int(port)}.sock")


def make_socket_dir(path: str) -> None:
    """Create the socket's directory private to this user, or check an existing one."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_socket_dir(path)


def check_socket_dir(path: str) -> None:
    """Refuse a directory another user could have put a socket into."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise PermissionError(f"{path} is not a directory")
    if st.st_uid not in (os.getuid(), 0):
        raise PermissionError(
            f"{path} belongs to uid {st.st_uid}, not to this user: another user could serve "
            f"a fake lmcache server there; set {SOCKET_DIR_ENV} to a directory of yours"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(
            f"{path} is writable by other users; make it 0700 or 0750 "
            f"(chmod go-w {path}) or set {SOCKET_DIR_ENV}"
        )
