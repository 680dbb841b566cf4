"""A real ``lmcache server`` process for tests and tools: started, waited for, killed.

Tests of MP mode run the server as users do (its own process, its own
arena), so ``kill -9`` of the server or of an engine is a real crash.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml


class ServerProcess:
    """``python -m lmcache_server`` with a cache config, on a private socket."""

    def __init__(
        self,
        config: Mapping[str, Any] | None = None,
        *,
        socket_path: str | None = None,
        port: int | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        #: A folder made here goes when the ``with`` block ends without an error (a failed
        #: one keeps it: its log says why); a folder given is the caller's.
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lmcache-server-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        self.env = dict(os.environ if env is None else env)
        #: Started as upstream's users start it (``--port``, no ``--socket``): its socket is
        #: then the local one for the port, in ``LMCACHE_SOCKET_DIR``.
        self.port = port
        if port is not None:
            from lmcache_core.mp.address import SOCKET_DIR_ENV, local_socket_for_port

            self.env.setdefault(SOCKET_DIR_ENV, str(self.workdir))
            saved = os.environ.get(SOCKET_DIR_ENV)
            os.environ[SOCKET_DIR_ENV] = self.env[SOCKET_DIR_ENV]
            try:
                self.socket_path = local_socket_for_port(port)
            finally:
                if saved is None:
                    os.environ.pop(SOCKET_DIR_ENV)
                else:
                    os.environ[SOCKET_DIR_ENV] = saved
        else:
            self.socket_path = socket_path or str(self.workdir / "lmcache.sock")
        self.config_path = self.workdir / "cache.yaml"
        self.config_path.write_text(yaml.safe_dump(dict(config or {})))
        self.args = list(args)
        self.env.pop("LMCACHE_CONFIG_FILE", None)
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lmcache_server",
                "--config",
                str(self.config_path),
                *(["--port", str(self.port)] if self.port is not None else []),
                *(["--socket", self.socket_path] if self.port is None else []),
                "--http-port",
                "0",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lmcache server exited at start:\n{self.log()}")
            if "lmcache server ready" in self.log():
                return self
            time.sleep(0.05)
        raise TimeoutError(f"lmcache server not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """``kill -9``: no flush, no clean-up (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM: lower tiers flushed, socket removed; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.stop()
        if self._own_workdir and exc_type is None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def private_dir(prefix: str = "lmc-") -> str:
    """A fresh directory only this user can enter (where a server's socket may live)."""
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o700)
    return d


def client_engine(
    url: str,
    config: Mapping[str, Any] | None = None,
    *,
    model: str = "test/model",
    layout: Any = None,
    timeout: float = 2.0,
) -> Any:
    """A :class:`~lmcache_core.CacheEngine` whose chunks live on the server at ``url``
    (``layout`` defaults to a small bf16 vLLM-flash layout; config: 16-token chunks)."""
    from lmcache_core import CacheConfig, CacheEngine, KVLayout
    from lmcache_core.mp.address import parse_server_url
    from lmcache_core.mp.client import ServerChunkStore

    layout = layout or KVLayout(
        kind="vllm_flash", dtype="bfloat16", num_layers=2, num_kv_heads=2, head_size=8, block_size=4
    )
    cfg = CacheConfig.from_dict(
        {"chunk_size": 16, "max_local_cpu_size": "1MiB", **dict(config or {}), "server_url": url}
    )

    def factory(ns: Any, metrics: Any) -> ServerChunkStore:
        return ServerChunkStore(parse_server_url(url), ns, metrics=metrics, timeout=timeout)

    return CacheEngine(cfg, model=model, layout=layout, store_factory=factory)
