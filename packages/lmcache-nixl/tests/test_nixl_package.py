"""The installed lmcache-nixl is this repository's, at this version."""

from importlib.metadata import version
from pathlib import Path

import lmcache_nixl


def test_installed_distribution_is_this_checkout():
    assert version("lmcache-nixl") == lmcache_nixl.__version__
    here = Path(__file__).resolve().parents[1]
    assert Path(lmcache_nixl.__file__).resolve().is_relative_to(here / "src")
