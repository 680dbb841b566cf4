"""The installed lmcache-sglang is this repository's, at this version."""

from importlib.metadata import version
from pathlib import Path

import lmcache_sglang


def test_installed_distribution_is_this_checkout():
    assert version("lmcache-sglang") == lmcache_sglang.__version__
    here = Path(__file__).resolve().parents[1]
    assert Path(lmcache_sglang.__file__).resolve().is_relative_to(here / "src")
