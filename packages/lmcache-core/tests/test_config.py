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
    assert "pre_caching_hash_algorithm" in caplog.text and "no effect here" in caplog.text
    assert c.use_layerwise is False


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
        ({"cache_policy": "ARC"}, "installed: fifo, lfu, lru, s3fifo"),
        ({"remote_serde": "nope"}, "installed: lz4, naive, zstd"),  # upstream's cachegen: a warning
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


# ---------------------------------------------------------------------------- values that escaped


@pytest.mark.parametrize(
    "values, words",
    [
        ({"max_local_cpu_size": "1e999"}, "max_local_cpu_size='1e999' is not a finite size"),
        ({"max_local_cpu_size": float("inf")}, "max_local_cpu_size=inf is not a finite size"),
        ({"max_local_cpu_size": float("nan")}, "max_local_cpu_size=nan is not a finite size"),
        ({"max_local_disk_size": "inf"}, "max_local_disk_size='inf' is not a size"),
        ({"max_local_cpu_size": "2000000TiB"}, "more than any machine holds"),
        ({"pin_timeout": "nan"}, "pin_timeout='nan' must be a finite number"),
        ({"tier_retry_backoff": float("nan")}, "tier_retry_backoff=nan must be a finite number"),
        ({"p2p_peer_ttl": "nan"}, "p2p_peer_ttl='nan' must be a finite number"),
        ({"blocking_timeout_secs": "inf"}, "blocking_timeout_secs='inf' must be a finite number"),
        ({"remote_url": "disk://x"}, "disk is not a remote tier; set local_disk"),
        ({"remote_url": "cpu://x"}, "cpu is not a remote tier; set local_cpu"),
        # upstream's lm://, redis-sentinel://... warn (test_upstream_configs.py)
        ({"remote_url": "nosuch://x"}, "no installed tier serves nosuch://"),
    ],
)
def test_values_that_escaped_the_checks_are_named_errors(values, words):
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(values)
    assert words in str(e.value), str(e.value)


def test_plugin_settings_in_extra_config_are_named_errors_when_the_config_is_read():
    """Declared with a kind and a range (config_extra.ExtraKey), so they fail at load,
    named, not when the tier is built (nor when it is used)."""
    for url, extra, words in (
        ("redis://127.0.0.1:1", {"redis_ttl": "abc"}, "extra_config.redis_ttl='abc' must be a"),
        ("redis://127.0.0.1:1", {"redis_ttl": -5}, "extra_config.redis_ttl=-5 must be between"),
        ("s3://bucket/p", {"s3_max_concurrency": 0}, "extra_config.s3_max_concurrency=0 must"),
    ):
        with pytest.raises(ConfigError) as e:
            CacheConfig.from_dict(
                {"remote_url": url, "extra_config": extra, "max_local_cpu_size": "1MiB"}
            )
        assert words in str(e.value), str(e.value)


def test_config_files_that_are_not_utf8_or_use_aliases_are_refused_fast(tmp_path):
    import time

    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("chunk_size: 256\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text.*save the config file as UTF-8"):
        CacheConfig.from_file(latin)
    # Nested aliases: a few hundred bytes that expand to 10**9 nodes for a walker.
    laughs = ["extra_config:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefgh"[i]
        laughs.append(f"  {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(laughs) + "\n")
    t = time.monotonic()
    with pytest.raises(ConfigError, match="aliases"):
        CacheConfig.from_file(bomb)
    assert time.monotonic() - t < 1.0


def test_local_disk_urls_read_as_upstream_reads_them():
    from pathlib import Path

    from lmcache_core.backends.chunk_files import path_from_url

    assert path_from_url("file://local_disk/") == Path("local_disk")  # upstream's example
    assert path_from_url("file:///var/cache/kv/") == Path("/var/cache/kv")
    assert path_from_url("file://~/kv/") == Path.home() / "kv"
    assert path_from_url("~/kv") == Path.home() / "kv"
    assert path_from_url("/abs/kv") == Path("/abs/kv")
    with pytest.raises(ConfigError, match="must be a path or a file:///path/ URL"):
        path_from_url("s3://bucket/kv")


def test_lmcache_config_fails_on_a_remote_url_no_tier_serves(tmp_path, capsys, monkeypatch):
    from lmcache_core.cli import main

    monkeypatch.delenv("LMCACHE_AUTH_SECRET", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text("remote_url: nosuch://localhost:65432\n")
    assert main(["config", "--file", str(f)]) != 0
    assert "no installed tier serves nosuch://" in capsys.readouterr().err
    # A shared tier without a secret is refused at start, saying how to set one ...
    f.write_text("remote_url: redis://localhost:6379\n")
    assert main(["config", "--file", str(f)]) != 0
    err = capsys.readouterr().err
    assert "has no deployment secret" in err and "LMCACHE_AUTH_SECRET" in err, err
    assert "openssl rand -hex 32" in err and "allow_unauthenticated_shared_tiers" in err, err
    # ... and starts with one, or with the explicit opt-out.
    monkeypatch.setenv("LMCACHE_AUTH_SECRET", "0123456789abcdef0123456789abcdef")
    assert main(["config", "--file", str(f)]) == 0
    monkeypatch.delenv("LMCACHE_AUTH_SECRET")
    f.write_text("remote_url: redis://localhost:6379\nallow_unauthenticated_shared_tiers: true\n")
    assert main(["config", "--file", str(f)]) == 0


# ---------------------------------------------------------------------------- ranges, text


REDIS = {"remote_url": "redis://127.0.0.1:1"}


@pytest.mark.parametrize(
    "values, words",
    [
        # values that passed and broke a tier at run time
        ({"blocking_timeout_secs": 1e300}, "blocking_timeout_secs=1e+300 must be > 0 and at most"),
        ({**REDIS, "extra_config": {"redis_connect_timeout": 1e300}}, "redis_connect_timeout=1e"),
        ({**REDIS, "extra_config": {"valkey_database": 10**30}}, "valkey_database=10000000"),
        ({**REDIS, "extra_config": {"redis_key_prefix": "a\ud800"}}, "lone surrogate"),
        ({**REDIS, "extra_config": {"redis_ttl": 1e300}}, "extra_config.redis_ttl=1e+300 must"),
        ({**REDIS, "extra_config": {"redis_ttl": 0.0001}}, "extra_config.redis_ttl=0.0001 must"),
        ({"p2p_peer_ttl": 1e-9}, "p2p_peer_ttl=1e-09 must be between 1 and 3600"),
        ({"local_disk": "/tmp/a\x00b", "max_local_disk_size": "1GiB"}, "local_disk='/tmp/a\\x00b"),
        # values that escaped as raw errors
        ({"chunk_size": "9" * 5000}, "chunk_size='999"),
        ({"chunk_size": int("9" * 4000)}, "chunk_size: an integer of more than 40 digits"),
        ({"max_local_cpu_size": 10**4000}, "max_local_cpu_size: a size of more than"),
        ({"pin_timeout": "9" * 5000}, "pin_timeout='999"),
        ({"extra_config": '{"a":' * 5000 + "1" + "}" * 5000}, "extra_config is nested too deeply"),
        ({"extra_config": {"model_id": "9" * 5000}}, "extra_config.model_id is 5000 characters"),
        ({"blend_check_layers": "[" * 100000 + "]" * 100000}, "blend_check_layers is nested"),
    ],
)
def test_values_that_broke_a_tier_or_escaped_raw_are_named_errors(values, words):
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(values)
    text = str(e.value)
    assert words in text, text
    assert len(text) < 1000, "a message quotes at most the start of a long value"


def test_every_numeric_key_has_a_range_and_every_string_key_a_character_check():
    import dataclasses

    from lmcache_core.config_checks import ITEM_RANGES, LIST_KINDS, NUMERIC_KINDS, RANGES

    for f in dataclasses.fields(CacheConfig):
        kind = f.metadata["kind"]
        if kind in NUMERIC_KINDS:
            assert f.name in RANGES, f"{f.name} ({kind}) has no range in config_checks.RANGES"
        if kind in LIST_KINDS:
            assert f.name in ITEM_RANGES, f"{f.name} ({kind}) has no range for its items"
        if kind in ("str", "opt_str", "raw_str"):
            for bad in ("x\ud800", "x\x00y", "x\x1by"):
                with pytest.raises(ConfigError) as e:
                    CacheConfig.from_dict({f.name: bad})
                assert f"{f.name}=" in str(e.value), str(e.value)


def test_every_problem_with_ranges_and_text_is_reported_at_once_by_name():
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(
            {
                **REDIS,
                "blocking_timeout_secs": 1e300,
                "p2p_peer_ttl": 1e-9,
                "local_disk": "/x\x00",
                "max_local_disk_size": "1GiB",
                "chunk_size": "9" * 5000,
                "extra_config": {"redis_ttl": 1e300, "valkey_database": 10**30},
            }
        )
    names = ["blocking_timeout_secs", "p2p_peer_ttl", "local_disk", "chunk_size"]
    problems = e.value.problems
    for name in names:
        assert any(p.startswith(name) for p in problems), (name, problems)
    # extra_config's values are checked once the top-level keys are valid
    with pytest.raises(ConfigError) as e:
        CacheConfig.from_dict(
            {**REDIS, "blocking_timeout_secs": 1e300,
             "extra_config": {"redis_ttl": 1e300, "valkey_database": 10**30}}
        )  # fmt: skip
    assert len(e.value.problems) == 3, e.value.problems


def test_deeply_nested_or_huge_numbers_in_files_and_the_environment_are_named_errors(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("extra_config: " + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ConfigError, match="nested more than 16 levels"):
        CacheConfig.from_file(deep)
    digits = tmp_path / "digits.yaml"
    digits.write_text("chunk_size: " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="chunk_size='9+.*has 5000 digits"):
        CacheConfig.from_file(digits)
    nested = '{"a":' * 100000 + "1" + "}" * 100000
    with pytest.raises(ConfigError, match="extra_config is nested too deeply"):
        CacheConfig.load({"LMCACHE_EXTRA_CONFIG": nested})
    with pytest.raises(ConfigError, match="extra_config holds a number of thousands of digits"):
        CacheConfig.load({"LMCACHE_EXTRA_CONFIG": '{"redis_ttl": ' + "9" * 5000 + "}"})
    # Bad values of declared keys are errors from the environment too (unknown keys warn).
    with pytest.raises(ConfigError, match="LMCACHE_EXTRA_CONFIG.redis_ttl=1e"):
        CacheConfig.load(
            {"LMCACHE_REMOTE_URL": "redis://h:1", "LMCACHE_EXTRA_CONFIG": '{"redis_ttl": 1e300}'}
        )


def test_a_third_party_plugin_declares_the_kind_and_range_of_its_keys():
    from lmcache_core.config_extra import ExtraKey, Reader, declared_keys, value_problems

    class TapeBackend:
        extra_config_keys = {
            "tape_speed": ExtraKey("metres per second", "number", minimum=0.1, maximum=20),
            "tape_label": ExtraKey("the label", "text", max_length=8),
            "tape_mode": ExtraKey("how", "choice", choices=("fast", "safe")),
            "tape_note": "a plain one-line declaration: parsed by the plugin itself",
        }

    keys = declared_keys(TapeBackend)
    assert keys["tape_speed"] == "metres per second"  # still its one line
    readers = [Reader("the tape tier", keys)]
    extra = {
        "tape_speed": 1e300,
        "tape_label": "far too long",
        "tape_mode": "slow",
        "tape_note": "\ud800",
    }
    problems = value_problems(extra, readers, "extra_config")
    assert problems == [
        "extra_config.tape_speed=1e+300 must be between 0.1 and 20",
        "extra_config.tape_label is 12 characters; at most 8",
        "extra_config.tape_mode='slow' must be one of fast, safe",
    ]
    assert value_problems({"tape_speed": "2.5", "tape_mode": "safe"}, readers, "x") == []
