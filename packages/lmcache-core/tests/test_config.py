"""CacheConfig: loading from files, the environment and dicts; one clear message per problem."""

from __future__ import annotations

import logging

import pytest
from lmcache_core.config import CacheConfig
from lmcache_core.errors import ConfigError
from lmcache_core.sizes import format_size, parse_size


def test_defaults_match_lmcache():
    c = CacheConfig()
    assert c.chunk_size == 256
    assert c.local_cpu is True
    assert c.max_local_cpu_size == 5 * 1024**3
    assert c.remote_serde == "naive"
    assert c.cache_policy == "LRU"
    assert c.hash_algorithm == "sha256"


def test_an_lmcache_yaml_file_loads_unchanged(tmp_path, caplog):
    f = tmp_path / "lmcache.yaml"
    f.write_text(
        "chunk_size: 256\nlocal_cpu: True\nmax_local_cpu_size: 5.0\n"
        "save_unfull_chunk: false\ncache_policy: LRU\nuse_layerwise: false\n"
        "pre_caching_hash_algorithm: builtin\n"
    )
    with caplog.at_level(logging.WARNING):
        c = CacheConfig.from_file(f)
    assert c.max_local_cpu_size == 5 * 1024**3
    assert c.save_unfull_chunk is False
    assert "use_layerwise" in caplog.text and "not used" in caplog.text


def test_environment_overrides_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_size: 128\nmax_local_cpu_size: 2GiB\n")
    env = {
        "LMCACHE_CONFIG_FILE": str(f),
        "LMCACHE_CHUNK_SIZE": "512",
        "LMCACHE_LOCAL_CPU": "false",
        "LMCACHE_EXTRA_CONFIG": '{"a": 1}',
    }
    c = CacheConfig.load(env)
    assert c.chunk_size == 512
    assert c.max_local_cpu_size == 2 * 1024**3
    assert c.local_cpu is False
    assert c.extra_config == {"a": 1}


def test_load_with_nothing_gives_defaults():
    assert CacheConfig.load({}) == CacheConfig()


def test_overrides_beat_everything():
    c = CacheConfig.load({"LMCACHE_CHUNK_SIZE": "512"}, overrides={"chunk_size": 64})
    assert c.chunk_size == 64


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict({"chunk_sise": 256})
    assert "unknown key 'chunk_sise'" in str(e.value)
    assert "did you mean 'chunk_size'" in str(e.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(
            {
                "chunk_size": "big",
                "local_cpu": "maybe",
                "max_local_cpu_size": "5 parsecs",
                "bogus": 1,
            }
        )
    assert len(e.value.problems) == 4
    text = str(e.value)
    assert "chunk_size='big' must be an integer" in text
    assert "local_cpu='maybe' is not a boolean" in text
    assert "unknown unit 'parsecs'" in text
    assert "4 problems" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"chunk_size": 0}, "chunk_size=0 must be between 1"),
        ({"hash_algorithm": "md5"}, "is not one of sha256, blake3, xxh3_128"),
        ({"cache_policy": "ARC"}, "installed: lru, s3fifo"),
        ({"remote_serde": "cachegen"}, "installed: lz4, naive, zstd"),
        ({"remote_url": "localhost:6379"}, "must be a URL such as redis://host:6379"),
        ({"local_disk": "file:///tmp/x"}, "max_local_disk_size is 0"),
        ({"local_disk": "s3://b", "max_local_disk_size": "1GiB"}, "file:///path/"),
        ({"pin_timeout": 0}, "pin_timeout=0.0 must be > 0"),
        ({"extra_config": "[1, 2]"}, "must be a mapping"),
        ({"max_local_cpu_size": -1}, "negative"),
        ({"local_cpu": 2}, "is not a boolean"),
    ],
)
def test_bad_values_say_what_is_allowed(values, message):
    with pytest.raises(ConfigError, match="problem") as e:
        CacheConfig.from_dict(values)
    assert message in str(e.value)


def test_policy_names_are_case_insensitive():
    assert CacheConfig.from_dict({"cache_policy": "S3FIFO"}).cache_policy == "S3FIFO"
    assert CacheConfig.from_dict({"cache_policy": "lru"}).cache_policy == "lru"


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*LMCACHE_CONFIG_FILE"):
        CacheConfig.load({"LMCACHE_CONFIG_FILE": str(tmp_path / "nope.yaml")})
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        CacheConfig.from_file(bad)
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        CacheConfig.from_file(top)


def test_stray_environment_variables_warn_with_a_suggestion(caplog):
    with caplog.at_level(logging.WARNING):
        c = CacheConfig.load({"LMCACHE_CHUNK_SIZ": "1", "LMCACHE_LOG_LEVEL": "debug"})
    assert c == CacheConfig()
    assert "LMCACHE_CHUNK_SIZ" in caplog.text and "LMCACHE_CHUNK_SIZE" in caplog.text
    assert "LOG_LEVEL" not in caplog.text


def test_replace_validates_and_describe_shows_units():
    c = CacheConfig().replace(max_local_cpu_size="512MiB")
    assert c.max_local_cpu_size == 512 * 1024**2
    assert "max_local_cpu_size: 512.0MiB" in c.describe()
    with pytest.raises(ConfigError):
        CacheConfig().replace(chunk_size=-5)


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("5GiB", 5 * 1024**3),
        ("512MB", 512 * 10**6),
        ("512 MiB", 512 * 1024**2),
        ("4096B", 4096),
        ("4096b", 4096),
        (1.5, int(1.5 * 1024**3)),
        ("2", 2 * 1024**3),
        (0, 0),
        ("1e3KB", 10**6),
        ("1TiB", 1024**4),
        ("10k", 10_000),
    ],
)
def test_sizes(text, nbytes):
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("bad", ["", "GiB", "5 GiBs", "-1GB", True, None, [1]])
def test_bad_sizes(bad):
    with pytest.raises(ValueError, match="size|negative|unit"):
        parse_size(bad, what="max_local_cpu_size")


def test_format_size():
    assert format_size(32 * 1024**2) == "32.0 MiB"
    assert format_size(12) == "12 B"


def test_replace_keeps_sizes_in_bytes():
    c = CacheConfig.from_dict({"max_local_cpu_size": "64MiB", "max_local_disk_size": "3GB"})
    r = c.replace(chunk_size=16)
    assert r.max_local_cpu_size == 64 * 2**20 and r.max_local_disk_size == c.max_local_disk_size
    assert r.chunk_size == 16
