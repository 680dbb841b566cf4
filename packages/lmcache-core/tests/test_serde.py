"""The naive serde runs the shipped serde contract."""

from __future__ import annotations

from lmcache_core.plugins import SERDES, load_plugin
from lmcache_core.serdes.naive import NaiveSerde
from lmcache_core.testing import SerdeTests


class TestNaiveSerde(SerdeTests):
    def make_serde(self):
        return NaiveSerde()


def test_naive_is_found_by_its_lmcache_name():
    assert load_plugin(SERDES, "naive") is NaiveSerde
    assert load_plugin(SERDES, "NAIVE") is NaiveSerde
