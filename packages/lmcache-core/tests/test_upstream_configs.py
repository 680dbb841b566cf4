"""Upstream LMCache's config files load here: its keys are used, mapped, or named as ignored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError

CONFIGS = sorted((Path(__file__).parent / "upstream_configs").glob("*.yaml"))


def test_there_are_upstream_configs_to_load():
    assert len(CONFIGS) >= 7


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_each_upstream_config_loads(path, caplog, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # file://local_disk/ is relative to where the engine runs
    with caplog.at_level(logging.WARNING):
        config = CacheConfig.from_file(path)
    assert config.chunk_size == 256
    text = path.read_text()
    ignored = [r.getMessage() for r in caplog.records if "no effect here" in r.getMessage()]
    if "pd_role" in text or "enable_controller" in text:
        assert ignored, "upstream keys lmcache does not use must be named in a warning"


def test_upstream_key_values_that_have_a_meaning_here_are_used(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    prod = CacheConfig.from_file(next(p for p in CONFIGS if p.stem == "production"))
    assert prod.pin_timeout == 300  # pin_timeout_sec
    assert prod.max_local_cpu_size == 40 * 2**30  # a bare number is GB (GiB), as upstream's
    disk = CacheConfig.from_file(next(p for p in CONFIGS if p.stem == "disk_offload"))
    assert disk.local_disk is not None and "local_disk" in disk.local_disk
    blend = CacheConfig.from_file(next(p for p in CONFIGS if p.stem == "blending"))
    assert blend.enable_blending and blend.blend_check_layers == (1,)
    assert blend.blend_recompute_ratios == (0.15,)
    p2p = CacheConfig.from_file(next(p for p in CONFIGS if p.stem == "p2p_controller"))
    assert not p2p.enable_p2p  # upstream's controller-based p2p: off here, with a warning


def test_a_typo_of_our_own_key_is_still_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'chunk_size'"):
        CacheConfig.from_dict({"chunk_sise": 256})


def test_upstream_environment_names_load(monkeypatch):
    monkeypatch.setenv("LMCACHE_PIN_TIMEOUT_SEC", "120")
    monkeypatch.setenv("LMCACHE_ENABLE_ASYNC_LOADING", "True")
    monkeypatch.setenv("LMCACHE_MAX_LOCAL_CPU_SIZE", "1.5")
    config = CacheConfig.load()
    assert config.pin_timeout == 120 and config.max_local_cpu_size == int(1.5 * 2**30)
