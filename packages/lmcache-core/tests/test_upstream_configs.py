"""Upstream LMCache's config files load here: its keys are used, mapped, or named as ignored."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
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


VENDORED = sorted((Path(__file__).parent / "upstream_configs" / "lmcache-0.5.6").glob("*.yaml"))


def test_every_vendored_upstream_config_is_here():
    """Upstream 0.5.6's examples/, tests/ and docs/ configs (see that folder's README)."""
    readme = (VENDORED[0].parent / "README.md").read_text()
    assert len(VENDORED) >= 160
    for path in VENDORED:
        assert f"`{path.name}`" in readme, f"{path.name} is not listed in the README"


@pytest.mark.parametrize("path", VENDORED, ids=lambda p: p.stem)
def test_each_vendored_upstream_config_loads_with_warnings_only(
    path, caplog, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING):
        CacheConfig.from_file(path)
    values = yaml.safe_load(path.read_text()) or {}
    said = " ".join(r.getMessage() for r in caplog.records)
    url = str(values.get("remote_url") or "")
    if url.split("://")[0] in ("lm", "mooncakestore", "mock", "infinistore", "external"):
        assert "runs without a remote tier" in said and "remote_url=" in said
    if values.get("remote_serde") == "cachegen":
        assert "remote_serde='cachegen'" in said and "naive" in said


def test_unsupported_upstream_backends_warn_and_what_lmcache_does_instead(caplog):
    with caplog.at_level(logging.WARNING):
        config = CacheConfig.from_dict(
            {
                "remote_url": "mooncakestore://127.0.0.1:50051/",
                "remote_serde": "cachegen",
                "extra_config": {"master_server_address": "x:1", "protocol": "tcp"},
            }
        )
    assert config.remote_url is None and config.remote_serde == "naive"
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "mooncakestore:// is Mooncake Store" in said and "without a remote tier" in said
    assert "master_server_address" in said and "protocol" in said
    # upstream's null serde is the default
    assert CacheConfig.from_dict({"remote_url": None, "remote_serde": None}).remote_serde == "naive"


def test_our_own_invalid_values_are_still_errors_all_reported_at_once():
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(
            {
                "chunk_sise": 256,  # a typo of ours
                "max_local_cpu_size": "lots",  # a bad value of ours
                "remote_url": "reddis://host:6379",  # a typo of our scheme
                "remote_serde": "nope",  # not a serde anyone has
                "enable_pd": True,  # upstream's: a warning, not a problem
            }
        )
    problems = e.value.problems
    assert len(problems) == 4, problems
    text = "\n".join(problems)
    assert "did you mean 'chunk_size'" in text and "max_local_cpu_size='lots'" in text
    assert "reddis://" in text and "remote_serde='nope'" in text


def test_a_bad_extra_config_value_is_reported_with_a_bad_top_level_key():
    """One round: an unknown top-level key no longer hides extra_config's problems."""
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(
            {
                "chunk_sise": 256,
                "remote_url": "redis://localhost:6379",
                "extra_config": {"redis_tll": 5},
            }
        )
    text = "\n".join(e.value.problems)
    assert "chunk_sise" in text and "did you mean 'redis_ttl'" in text
