"""The server's HTTP endpoint: health, status, clear, metrics, tenant quotas.

Paths are upstream LMCache's (``/healthcheck``, ``/status``, ``/clear-cache``,
``/metrics``, ``/quota/{cache_salt}``), with its older ``/api/...`` forms as
aliases, so probes and scripts written for upstream work unchanged.

Safe by default, unlike upstream's (LMCache#5128 shipped an unauthenticated
endpoint that runs scripts, bound to every interface):

* it binds loopback unless told otherwise;
* bound anywhere else it refuses to start without the deployment secret, and
  then every path but the health check requires ``Authorization: Bearer
  <secret>`` (compared in constant time);
* no path executes anything; request bodies are bounded (4 KiB) and must be
  JSON objects where one is expected.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from lmcache_core.auth import secrets_of
from lmcache_core.errors import ConfigError
from lmcache_core.mp.address import is_loopback

if TYPE_CHECKING:
    from lmcache_server.server import CacheServer

logger = logging.getLogger(__name__)

MAX_BODY = 4096


def start_admin(server: CacheServer, host: str, port: int) -> ThreadingHTTPServer | None:
    """Serve the admin endpoint on ``host:port`` from a daemon thread (None: not started)."""
    secret = server.registry.secret
    open_to_network = not is_loopback(host)
    if open_to_network and secret is None:
        raise ConfigError(
            [
                f"the admin endpoint on {host}:{port} is reachable from the network and needs "
                "the deployment secret (LMCACHE_AUTH_SECRET or auth_secret_file), or bind it to "
                "127.0.0.1 (--http-host)"
            ]
        )
    token = secret if open_to_network else None

    class Handler(_AdminHandler):
        cache_server = server
        bearer = token

    try:
        httpd = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        logger.error(
            "lmcache server: admin endpoint not started on %s:%d (%s); pick a free --http-port",
            host,
            port,
            e,
        )
        return None
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True, name="lmcache-admin").start()
    logger.info("lmcache server: admin endpoint on http://%s:%d", host, httpd.server_address[1])
    return httpd


class _AdminHandler(BaseHTTPRequestHandler):
    cache_server: CacheServer
    bearer: bytes | None = None
    server_version = "lmcache-server"

    def log_message(self, fmt: str, *args: Any) -> None:
        logger.debug("admin: " + fmt, *args)

    # ------------------------------------------------------------------ plumbing

    def _reply(self, code: int, payload: Any, ctype: str = "application/json") -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        if self.bearer is None:
            return True
        header = self.headers.get("Authorization", "")
        given = header[7:].strip().encode() if header.startswith("Bearer ") else b""
        if any(hmac.compare_digest(given, s) for s in secrets_of(self.bearer)):
            return True
        self.cache_server.metrics.inc("lmcache:server_auth_failures")
        self._reply(401, {"error": "send Authorization: Bearer <deployment secret>"})
        return False

    def _body(self) -> dict[str, Any] | None:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_BODY:
            self._reply(413, {"error": f"a body of at most {MAX_BODY} bytes"})
            return None
        raw = self.rfile.read(n) if n else b"{}"
        try:
            obj = json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            obj = None
        if not isinstance(obj, dict):
            self._reply(400, {"error": "the body must be a JSON object"})
            return None
        return obj

    def _path(self) -> str:
        path = urlparse(self.path).path.rstrip("/") or "/"
        return path[4:] if path.startswith("/api/") else path

    # ------------------------------------------------------------------ routes

    def do_GET(self) -> None:
        path = self._path()
        srv = self.cache_server
        if path in ("/healthcheck", "/health", "/healthz"):
            self._reply(200, {"status": "healthy"})
            return
        if not self._authorized():
            return
        if path == "/":
            self._reply(200, {"status": "ok", "service": "lmcache server"})
        elif path == "/status":
            self._reply(200, srv.status())
        elif path == "/version":
            self._reply(200, srv.version)
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self._reply(200, generate_latest(srv.registry_for_metrics()), CONTENT_TYPE_LATEST)
        elif path == "/quota":
            self._reply(200, {"users": srv.registry.quotas.by_salt()})
        elif path.startswith("/quota/"):
            salt = _salt(path)
            self._reply(200, srv.registry.quotas.describe(salt))
        else:
            self._reply(404, {"error": f"no such path {path}"})

    def do_POST(self) -> None:
        path = self._path()
        if not self._authorized():
            return
        if path == "/clear-cache":
            if self._body() is None:
                return
            n = self.cache_server.clear()
            self._reply(200, {"status": "ok", "chunks_removed": n})
        else:
            self._reply(404, {"error": f"no such path {path}"})

    def do_PUT(self) -> None:
        path = self._path()
        if not self._authorized():
            return
        if not path.startswith("/quota/"):
            self._reply(404, {"error": f"no such path {path}"})
            return
        body = self._body()
        if body is None:
            return
        limit = body.get("limit_gb")
        if (
            not isinstance(limit, (int, float))
            or isinstance(limit, bool)
            or not math.isfinite(limit)
            or limit < 0
        ):
            self._reply(400, {"error": "limit_gb must be a finite number >= 0"})
            return
        salt = _salt(path)
        self.cache_server.registry.quotas.set_quota(salt, int(limit * 2**30))
        self._reply(200, {"cache_salt": salt, "limit_gb": limit, "status": "ok"})

    def do_DELETE(self) -> None:
        path = self._path()
        if not self._authorized():
            return
        if not path.startswith("/quota/"):
            self._reply(404, {"error": f"no such path {path}"})
            return
        salt = _salt(path)
        removed = self.cache_server.registry.quotas.set_quota(salt, None)
        self._reply(200, {"cache_salt": salt, "status": "removed" if removed else "not_found"})


def _salt(path: str) -> str:
    """The ``cache_salt`` of ``/quota/<salt>`` (``_default``: requests without a salt)."""
    salt = unquote(path[len("/quota/") :])
    return "" if salt == "_default" else salt
