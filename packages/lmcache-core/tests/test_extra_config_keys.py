"""extra_config keys are as strict as top-level keys: each plugin declares the keys it reads,
and a key no plugin in use declares is reported when the config is loaded, with the closest
name (an error in a file or overrides, a warning in LMCACHE_EXTRA_CONFIG); upstream
LMCache's keys that mean nothing here are accepted with a warning naming them."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
from lmcache_core import plugins
from lmcache_core.config import CacheConfig
from lmcache_core.config_extra import ENGINE_KEYS, UPSTREAM_EXTRA_KEYS, declared_keys
from lmcache_core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
REDIS = {"remote_url": "redis://127.0.0.1:6379"}
S3 = {"remote_url": "s3://bucket/prefix"}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_misspelt_key_in_a_config_file_fails_with_the_closest_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("remote_url: redis://127.0.0.1:6379\nextra_config:\n  redis_tll: 60\n")
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_file(f)
    assert str(f) in str(e.value)
    assert "extra_config: unknown key 'redis_tll'; did you mean 'redis_ttl'?" in str(e.value)
    assert "redis_key_prefix" in str(e.value)  # what the tiers in use read
    f.write_text("remote_url: redis://127.0.0.1:6379\nextra_config:\n  redis_ttl: 60\n")
    assert CacheConfig.from_file(f).extra_config == {"redis_ttl": 60}


def test_every_unknown_key_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict({**S3, "extra_config": {"s3_regoin": "x", "s3_endpoint": "y"}})
    assert len(e.value.problems) == 2
    assert "did you mean 's3_region'" in str(e.value)
    assert "did you mean 's3_endpoint_url'" in str(e.value)


def test_auth_secret_is_reported_with_the_real_key_wherever_it_comes_from(monkeypatch):
    """Issue 32: an unknown key such as auth_secret is reported, not silently unused."""
    for where in ("file", "environment"):
        with pytest.raises(ConfigError) as e:
            if where == "file":
                CacheConfig.from_dict({**REDIS, "extra_config": {"auth_secret": "hunter2"}})
            else:
                env = {"LMCACHE_EXTRA_CONFIG": json.dumps({"auth_secret": "hunter2"})}
                CacheConfig.load(env)
        where_said = "extra_config" if where == "file" else "LMCACHE_EXTRA_CONFIG"
        assert f"{where_said}.auth_secret: never put the secret in the cache config" in str(e.value)
        assert "auth_secret_file" in str(e.value) and "LMCACHE_AUTH_SECRET" in str(e.value)
        assert "hunter2" not in str(e.value)
    # A near miss of it is pointed at the top-level key.
    with pytest.raises(ConfigError, match="did you mean the top-level key 'auth_secret_file'"):
        CacheConfig.from_dict({**REDIS, "extra_config": {"auth_secrets": "/etc/x"}})


def test_a_top_level_key_in_extra_config_is_said_to_be_one():
    with pytest.raises(ConfigError, match="extra_config.chunk_size is a top-level key"):
        CacheConfig.from_dict({"extra_config": {"chunk_size": 512}})


def test_unknown_keys_in_the_environment_are_warnings_naming_the_variable(caplog):
    env = {"LMCACHE_REMOTE_URL": REDIS["remote_url"], "LMCACHE_EXTRA_CONFIG": '{"redis_tll": 9}'}
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        config = CacheConfig.load(env)
    assert config.extra_config == {"redis_tll": 9}
    (message,) = [m for m in _warnings(caplog) if "redis_tll" in m]
    assert "LMCACHE_EXTRA_CONFIG: unknown key 'redis_tll'; did you mean 'redis_ttl'?" in message
    # The same key from overrides (kv_connector_extra_config, SGLang's extra config) is an error.
    with pytest.raises(ConfigError, match="did you mean 'redis_ttl'"):
        CacheConfig.load(env, overrides={"extra_config": {"redis_tll": 9}})
    # And from a file, even when the environment sets other keys.
    with pytest.raises(ConfigError, match="did you mean 'redis_ttl'"):
        CacheConfig.from_dict({**REDIS, "extra_config": {"redis_tll": 9}})


def test_upstream_only_keys_are_accepted_with_a_warning_naming_them(caplog):
    extra = {
        "s3_prefer_http2": False,
        "s3_part_size": 1 << 20,
        "save_chunk_meta": False,
        "external_backend.log.module_path": "x.y",
        "s3_region": "eu-west-1",
    }
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        config = CacheConfig.from_dict({**S3, "extra_config": extra})
    assert config.extra_config == extra
    (message,) = [m for m in _warnings(caplog) if "upstream LMCache extra_config keys" in m]
    for key in ("s3_prefer_http2", "s3_part_size", "save_chunk_meta", "external_backend."):
        assert key in message
    assert "s3_region" not in message  # used here


def test_the_upstream_p2p_config_names_its_extra_key_in_a_warning(caplog, monkeypatch):
    path = Path(__file__).parent / "upstream_configs" / "p2p_controller.yaml"
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        CacheConfig.from_file(path)
    assert any("extra_config" in m and "lookup_backoff_time" in m for m in _warnings(caplog))


def test_a_key_of_an_installed_tier_not_in_use_warns_naming_the_tier(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        config = CacheConfig.from_dict({**S3, "extra_config": {"redis_ttl": 60}})
    assert config.extra_config == {"redis_ttl": 60}
    assert any("redis_ttl has no effect" in m and "the redis tier" in m for m in _warnings(caplog))


def test_keys_the_tiers_in_use_and_the_engine_read_load_without_a_word(caplog, tmp_path):
    values = {
        **REDIS,
        "local_disk": str(tmp_path),
        "max_local_disk_size": "1GiB",
        "extra_config": {"redis_ttl": 5, "use_odirect": True, "model_id": "org/model"},
    }
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        CacheConfig.from_dict(values)
    assert not [m for m in _warnings(caplog) if "extra_config" in m]


def test_replace_checks_extra_config_only_when_it_replaces_it(caplog):
    with caplog.at_level(logging.WARNING, logger="lmcache_core.config"):
        config = CacheConfig.load({"LMCACHE_EXTRA_CONFIG": '{"nosuch": 1}'})
    assert config.replace(chunk_size=128).extra_config == {"nosuch": 1}
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        config.replace(extra_config={"nosuch": 1})


# Where a built-in reader reads a key: extra.get("k"), extra_number(config, "k", ...),
# extra_bool(config, "k"), "k" in extra, extra_config.get("k").
_READS = re.compile(
    r'extra(?:_config)?\.get\(\s*"(\w+)"|extra_(?:number|bool)\(\s*config,\s*"(\w+)"'
    r'|"(\w+)"\s+(?:not\s+)?in\s+extra\b'
)


@pytest.mark.parametrize(
    ("group", "name", "source"),
    [
        ("lmcache.backends", "redis", "packages/lmcache-core/src/lmcache_core/backends/redis.py"),
        ("lmcache.backends", "s3", "packages/lmcache-core/src/lmcache_core/backends/s3.py"),
        ("lmcache.backends", "disk", "packages/lmcache-core/src/lmcache_core/backends/disk.py"),
        ("lmcache.backends", "fs", "packages/lmcache-core/src/lmcache_core/backends/fs.py"),
        ("lmcache.backends", "p2p", "packages/lmcache-core/src/lmcache_core/backends/p2p.py"),
        ("lmcache.backends", "cpu", "packages/lmcache-core/src/lmcache_core/backends/cpu.py"),
        ("lmcache.backends", "nixl", "packages/lmcache-nixl/src/lmcache_nixl/storage.py"),
        (None, "vllm adapter", "packages/lmcache-vllm/src/lmcache_vllm/settings.py"),
    ],
)
def test_every_key_a_built_in_reader_reads_is_declared(group, name, source):
    text = (ROOT / source).read_text()
    if group is None:  # the engine adapter reads the cache config's extra_config
        text = "\n".join(line for line in text.splitlines() if "config.extra_config" in line)
        declared = dict(ENGINE_KEYS)
    else:
        declared = dict(declared_keys(plugins.load_plugin(group, name)))
    read = {k for groups in _READS.findall(text) for k in groups if k}
    assert read <= set(declared), (
        f"{name} reads undeclared extra_config keys {read - set(declared)}"
    )
    assert not set(declared) & UPSTREAM_EXTRA_KEYS


def test_the_configuration_docs_list_every_declared_key():
    doc = (ROOT / "docs/configuration.md").read_text()
    keys = set(ENGINE_KEYS)
    for group in (plugins.BACKENDS, plugins.SERDES, plugins.TRANSPORTS, plugins.EVICTION_POLICIES):
        for name in plugins.installed_names(group):
            keys |= set(declared_keys(plugins.load_plugin(group, name)))
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"docs/configuration.md does not describe extra_config keys {missing}"
