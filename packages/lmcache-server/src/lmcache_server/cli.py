"""``lmcache server``: run this host's cache server.

The cache config is the one every engine reads (``--config`` or
``LMCACHE_CONFIG_FILE``, then ``LMCACHE_*`` variables), so a deployment keeps
one file. Upstream LMCache's ``lmcache server`` flags are accepted as well, so
its documented quick start runs unchanged::

    lmcache server --l1-size-gb 100 --eviction-policy LRU
    vllm serve M --kv-transfer-config \\
        '{"kv_connector":"LMCacheMPConnector","kv_role":"kv_both"}'

Each upstream flag is honoured (``--l1-size-gb``, ``--chunk-size``,
``--eviction-policy``, ``--port``, ``--host``, ``--shm-name``, ``--http-host``,
``--http-port``, some ``--l2-adapter`` types) or reported at start as having
no effect here, with why.

Where clients connect:

* the Unix socket ``--socket`` (default: the local socket of ``--port``,
  ``/tmp/lmcache-<uid>/lmcache-<port>.sock``, which clients given
  ``tcp://localhost:<port>`` use): no secret needed, file permissions guard it;
* TCP on ``--host:--port`` only when ``--host`` is not loopback (or
  ``--tcp``): then the deployment secret is required, and ``--shm-name``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from lmcache_core.config import CacheConfig
from lmcache_core.config_sources import CONFIG_FILE_ENV
from lmcache_core.errors import LMCacheError
from lmcache_core.mp.address import DEFAULT_PORT, is_loopback, local_socket_for_port

from lmcache_server.server import CacheServer

logger = logging.getLogger("lmcache_server")

#: Upstream flags we accept and ignore, with why (said once at start).
_NO_EFFECT = {
    "max_workers": "each client has a thread of its own here",
    "max_gpu_workers": "each client has a thread of its own here",
    "max_cpu_workers": "each client has a thread of its own here",
    "supported_transfer_mode": "engines always copy through the shared arena here",
    "hash_algorithm": "engines hash their prompts (hash_algorithm in the cache config)",
    "engine_type": "blending runs in the engine (enable_blending in the cache config)",
    "l1_use_lazy": "the arena is reserved (and made resident) at start",
    "l1_init_size_gb": "the arena is reserved (and made resident) at start",
    "instance_id": "the server has no fleet identity here",
    "prometheus_port": "metrics are served on the admin endpoint (--http-port)",
}

_UPSTREAM_POLICIES = {"lru": "LRU", "isolatedlru": "LRU", "noop": None, "arc": None}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmcache server",
        description="The cache server of this host: one DRAM arena and tier cascade shared by "
        "every engine here (MP mode).",
    )
    p.add_argument("--config", help="the cache YAML (default: LMCACHE_CONFIG_FILE, LMCACHE_*)")
    p.add_argument("--socket", help="Unix socket path (default: the local socket of --port)")
    p.add_argument(
        "--socket-mode", default="660", help="file mode of the socket, octal (default 660)"
    )
    p.add_argument("--host", default="localhost", help="TCP address (upstream's flag)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (upstream's flag)")
    p.add_argument(
        "--tcp", action="store_true", help="also listen on TCP --host:--port (needs the secret)"
    )
    p.add_argument("--shm-name", default=None, help="name the arena in /dev/shm for TCP clients")
    p.add_argument("--l1-size-gb", type=float, default=None, help="DRAM arena, GiB")
    p.add_argument("--chunk-size", type=int, default=None, help="default tokens per chunk")
    p.add_argument("--eviction-policy", default=None, help="LRU (upstream's flag; or cache_policy)")
    p.add_argument("--http-host", default="127.0.0.1", help="admin endpoint address")
    p.add_argument("--http-port", type=int, default=8080, help="admin endpoint port (0: off)")
    p.add_argument(
        "--l2-adapter",
        action="append",
        default=[],
        help="upstream's L2 JSON; fs and resp/valkey map to local_disk and remote_url",
    )
    p.add_argument("--log-level", default="INFO")
    for flag in _NO_EFFECT:
        p.add_argument("--" + flag.replace("_", "-"), default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> tuple[CacheConfig, list[str]]:
    """The cache config with upstream's flags applied, and what was ignored (to say)."""
    overrides: dict[str, Any] = {}
    notes: list[str] = []
    if args.l1_size_gb is not None:
        overrides["max_local_cpu_size"] = f"{args.l1_size_gb}GiB"
    if args.chunk_size is not None:
        overrides["chunk_size"] = args.chunk_size
    if args.eviction_policy is not None:
        name = _UPSTREAM_POLICIES.get(args.eviction_policy.lower(), args.eviction_policy)
        if name is None:
            notes.append(f"--eviction-policy {args.eviction_policy} is not available; using LRU")
            name = "LRU"
        if args.eviction_policy.lower() == "isolatedlru":
            notes.append("IsolatedLRU: per-tenant quotas are tenant_quotas (or PUT /quota/<salt>)")
        overrides["cache_policy"] = name
    for raw in args.l2_adapter:
        overrides.update(_l2_adapter(raw, notes))
    for flag, why in _NO_EFFECT.items():
        if getattr(args, flag, None) is not None:
            notes.append(f"--{flag.replace('_', '-')} has no effect here: {why}")
    env = dict(os.environ)
    if args.config:
        env[CONFIG_FILE_ENV] = args.config
    return CacheConfig.load(env, overrides=overrides), notes


def _l2_adapter(raw: str, notes: list[str]) -> dict[str, Any]:
    try:
        spec = json.loads(raw)
    except (ValueError, RecursionError):
        raise SystemExit(f"lmcache server: --l2-adapter {raw!r} is not JSON") from None
    if not isinstance(spec, dict):
        raise SystemExit(f"lmcache server: --l2-adapter {raw!r} is not a JSON object")
    kind = str(spec.get("type", "")).lower()
    if kind == "fs" and spec.get("base_path"):
        if not spec.get("max_size_gb"):
            raise SystemExit(
                'lmcache server: --l2-adapter fs needs "max_size_gb" here: the disk tier is '
                "bounded (or set local_disk and max_local_disk_size in the cache config)"
            )
        return {
            "local_disk": f"file://{spec['base_path']}",
            "max_local_disk_size": f"{spec['max_size_gb']}GiB",
        }
    if kind in ("resp", "valkey") and (spec.get("host") or spec.get("startup_nodes")):
        host = spec.get("host") or str(spec["startup_nodes"]).split(",")[0].split(":")[0]
        port = spec.get("port", 6379)
        scheme = "valkey+cluster" if spec.get("cluster_mode") else "redis"
        return {"remote_url": f"{scheme}://{host}:{port}"}
    notes.append(
        f"--l2-adapter type {kind or '?'} is not available here; configure the tiers in the "
        "cache config (local_disk, remote_url)"
    )
    return {}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config, notes = config_from_args(args)
        for note in notes:
            logger.warning("lmcache server: %s", note)
        socket_path = args.socket or local_socket_for_port(args.port)
        tcp = args.tcp or not is_loopback(args.host)
        server = CacheServer(
            config,
            socket_path=socket_path,
            tcp_host=args.host if tcp else None,
            tcp_port=args.port if tcp else None,
            shm_name=args.shm_name,
            admin_host=args.http_host,
            admin_port=args.http_port or None,
            socket_mode=int(str(args.socket_mode), 8),
        )
    except LMCacheError as e:
        print(f"lmcache server: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        logger.info("lmcache server: signal %d, stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if not tcp:
        logger.info(
            "lmcache server: no TCP listener (host %s is this host); clients given "
            "tcp://%s:%d or server_url unix://%s connect through the socket",
            args.host,
            args.host,
            args.port,
            socket_path,
        )
    print(f"lmcache server ready: unix://{socket_path}", flush=True)
    try:
        stop.wait()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
