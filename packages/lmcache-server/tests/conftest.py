"""Fixtures: a cache server in this process (fast); crash tests start their own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from lmcache_core import CacheConfig
from lmcache_server import CacheServer
from lmcache_server.testing import private_dir


@pytest.fixture
def server() -> Iterator[CacheServer]:
    sock = os.path.join(private_dir(), "lmcache.sock")
    srv = CacheServer(
        CacheConfig.from_dict({"chunk_size": 16, "max_local_cpu_size": "1MiB"}), socket_path=sock
    )
    yield srv
    srv.close(1.0)


@pytest.fixture
def url(server: CacheServer) -> str:
    return f"unix://{server.socket_path}"
