"""The installed lmcache-vllm is this repository's, at this version."""

from importlib.metadata import version
from pathlib import Path

import lmcache_vllm


def test_installed_distribution_is_this_checkout():
    assert version("lmcache-vllm") == lmcache_vllm.__version__
    here = Path(__file__).resolve().parents[1]
    assert Path(lmcache_vllm.__file__).resolve().is_relative_to(here / "src")
