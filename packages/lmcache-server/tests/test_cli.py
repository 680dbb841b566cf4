"""``lmcache server``: upstream's flags, the cache config, start and stop as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from lmcache_core.mp.address import parse_server_url
from lmcache_core.mp.connection import server_about
from lmcache_core.testing.servers import free_port
from lmcache_server.cli import build_parser, config_from_args
from lmcache_server.testing import private_dir


def test_upstream_flags_map_to_cache_config_keys_or_are_reported(tmp_path):
    args = build_parser().parse_args(
        [
            "--l1-size-gb", "0.5", "--eviction-policy", "LRU", "--chunk-size", "128",
            "--max-workers", "4", "--supported-transfer-mode", "auto",
            "--l2-adapter", f'{{"type": "fs", "base_path": "{tmp_path}", "max_size_gb": 2}}',
            "--l2-adapter", '{"type": "mooncake_store"}',
        ]
    )  # fmt: skip
    config, notes = config_from_args(args)
    assert config.max_local_cpu_size == 2**29
    assert config.chunk_size == 128 and config.cache_policy == "LRU"
    assert config.local_disk == f"file://{tmp_path}"
    assert config.max_local_disk_size == 2 * 2**30
    text = "\n".join(notes)
    assert "--max-workers has no effect" in text
    assert "--supported-transfer-mode has no effect" in text
    assert "mooncake_store is not available" in text


def test_the_cache_yaml_is_read_and_flags_win_over_it(tmp_path):
    cfg = tmp_path / "cache.yaml"
    cfg.write_text("chunk_size: 64\nmax_local_cpu_size: 1GiB\ncache_policy: s3fifo\n")
    config, _ = config_from_args(build_parser().parse_args(["--config", str(cfg),
                                                             "--chunk-size", "32"]))  # fmt: skip
    assert config.chunk_size == 32 and config.max_local_cpu_size == 2**30
    assert config.cache_policy == "s3fifo"


def test_lmcache_server_with_upstream_flags_serves_its_port_socket_and_stops_clean():
    sockets = private_dir()
    port = free_port()
    env = {**os.environ, "LMCACHE_SOCKET_DIR": sockets}
    env.pop("LMCACHE_CONFIG_FILE", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmcache_core.cli", "server", "--port", str(port),
         "--l1-size-gb", "0.01", "--chunk-size", "128", "--http-port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        sock = os.path.join(sockets, f"lmcache-{port}.sock")
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.environ["LMCACHE_SOCKET_DIR"] = sockets
        try:
            about = server_about(parse_server_url(f"tcp://localhost:{port}"))
        finally:
            os.environ.pop("LMCACHE_SOCKET_DIR")
        assert about["chunk_size"] == 128  # what upstream's connector asks the server
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "no TCP listener" in out
        assert not os.path.exists(sock)
    finally:
        if proc.poll() is None:
            proc.kill()
