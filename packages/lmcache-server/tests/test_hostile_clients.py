"""The shipped hostile-client suite against lmcache's own server."""

from __future__ import annotations

import pytest
from lmcache_core.testing.mp_hostile import HostileClientTests


class TestCacheServerHostileClients(HostileClientTests):
    @pytest.fixture
    def server_url(self, url: str) -> str:
        return url
