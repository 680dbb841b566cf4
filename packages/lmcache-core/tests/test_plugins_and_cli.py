"""Plugin discovery (a third-party plugin via a real entry point) and the lmcache CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from lmcache_core import plugins
from lmcache_core.errors import PluginNotFoundError
from lmcache_core.metrics import Metrics


def test_built_ins_register_through_entry_points():
    assert "cpu" in plugins.installed_names(plugins.BACKENDS)
    assert {"lru", "s3fifo"} <= set(plugins.installed_names(plugins.EVICTION_POLICIES))
    assert "naive" in plugins.installed_names(plugins.SERDES)


def test_unknown_and_known_but_missing_plugins_are_actionable(monkeypatch):
    with pytest.raises(PluginNotFoundError, match=r"installed: cpu.*Did you mean 'cpu'"):
        plugins.load_plugin(plugins.BACKENDS, "cpv")
    # A name we know of but that is not installed: the error says what to install.
    # (Every real hint's package is installed in this environment, so one is added.)
    hints = {**plugins.KNOWN_PLUGINS[plugins.BACKENDS], "tape": "pip install 'lmcache[tape]'"}
    monkeypatch.setitem(plugins.KNOWN_PLUGINS, plugins.BACKENDS, hints)
    with pytest.raises(PluginNotFoundError, match=r"plugin 'tape' is not installed: pip install"):
        plugins.load_plugin(plugins.BACKENDS, "tape")


def test_a_third_party_plugin_just_works(tmp_path):
    """A distribution that declares an lmcache.eviction_policies entry point is found by name."""
    pkg = tmp_path / "lmcache_foo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent("""
        from lmcache_core.eviction.lru import LRUPolicy
        class FooPolicy(LRUPolicy):
            name = "foo"
    """)
    )
    dist = tmp_path / "lmcache_foo-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lmcache-foo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[lmcache.eviction_policies]\nfoo = lmcache_foo:FooPolicy\n"
    )
    code = (
        "from lmcache_core.config import CacheConfig\n"
        "from lmcache_core.plugins import load_plugin, EVICTION_POLICIES\n"
        "c = CacheConfig.from_dict({'cache_policy': 'foo'})\n"
        "print(load_plugin(EVICTION_POLICIES, c.cache_policy)().name)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "foo"


def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lmcache_core.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_config_prints_the_resolved_config(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_size: 512\nmax_local_cpu_size: 2GiB\n")
    out = _cli("config", env={"LMCACHE_CONFIG_FILE": str(f), "LMCACHE_LOCAL_CPU": "false"})
    assert out.returncode == 0, out.stderr
    assert "chunk_size: 512" in out.stdout
    assert "max_local_cpu_size: 2.0GiB" in out.stdout
    assert "local_cpu: false" in out.stdout


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("chunk_sise: 512\n")
    out = _cli("config", "--file", str(f))
    assert out.returncode == 2
    assert "did you mean 'chunk_size'" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_plugins_and_version():
    out = _cli("plugins")
    assert out.returncode == 0 and "lmcache.backends: cpu" in out.stdout
    out = _cli("version")
    assert out.returncode == 0 and "lmcache-core 0." in out.stdout


def test_metrics_reject_unknown_names():
    with pytest.raises(KeyError, match="unknown metric"):
        Metrics().inc("lmcache:nope")


def test_metrics_are_served_over_http():
    import urllib.request

    from lmcache_core.metrics import serve_metrics

    m = Metrics()
    m.inc("lmcache:num_hit_tokens", 134217729)
    m.inc("lmcache:stored_bytes", 5, tier="disk")
    m.observe("lmcache:time_to_retrieve", 0.003)
    server = serve_metrics(m, 0, host="127.0.0.1")
    try:
        port = server.server_address[1]
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        # prometheus_client's exposition: counters end in _total, values are exact.
        assert b"lmcache:num_hit_tokens_total 1.34217729e+08" in body
        assert b'lmcache:stored_bytes_total{tier="disk"} 5.0' in body
        assert b'lmcache:time_to_retrieve_bucket{le="0.005"} 1.0' in body
        assert b'lmcache:time_to_retrieve_bucket{le="0.0025"} 0.0' in body
    finally:
        server.shutdown()
