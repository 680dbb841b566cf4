"""deploy/: the Helm chart and the recipes, checked offline (issue 34, items 3-5).

* A real Helm (helm-python-sdk: Helm's Go SDK through ctypes) lints and renders
  the chart; every rendered object is validated against the Kubernetes API
  schemas (kubernetes-validate, strict) of every version from 1.27 on.
* Every LMCACHE_* variable, `lmcache server` flag, cache-config key and vLLM
  connector setting in the chart and the recipes is checked against what
  lmcache's packages read, taken from their code (CacheConfig.keys(),
  config_sources, lmcache_server.cli.build_parser, the vLLM adapter's
  settings): a key renamed there fails here.
* The server the chart renders, and the one the podman recipe runs, are
  started as written (flags, config file, secret file) and answer their
  probes, Prometheus and an engine on their socket; each recipe's engine
  resolves its cache config as the connector does and lands on that socket.

What needs a cluster (kubectl apply --dry-run, scheduling, the kubelet's
hostPath, Prometheus Operator's CRD) is not checked: docs/deployment.md says
what was verified and what was not.
"""

from __future__ import annotations

import ast
import base64
import copy
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "lmcache"
RECIPES = ROOT / "deploy" / "recipes"
DOC = ROOT / "docs" / "deployment.md"
#: The chart's socket with its default values; every recipe points its engines here.
SOCKET_DIR = "/run/lmcache"
SOCKET = f"{SOCKET_DIR}/lmcache.sock"
#: The release name the recipes assume (`helm install lmcache deploy/helm/lmcache`):
#: its ConfigMap and Secret are then `lmcache` and `lmcache-auth`.
RELEASE = "lmcache"
OLDEST_KUBE = Version("1.27")
GIB = 1 << 30
MIB = 1 << 20

DEPS = "tools/requirements-deploy.txt (tools/setup.sh installs it)"


def _helm() -> Any:
    return pytest.importorskip(
        "helm_python", reason=f"helm-python-sdk renders the chart: install {DEPS}"
    )


def _kv() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason=f"kubernetes-validate has the API schemas: install {DEPS}"
    )


def kube_versions() -> list[str]:
    """Kubernetes 1.27 (production-stack's own kind cluster) to the newest schemas shipped."""
    _kv()
    from kubernetes_validate import utils

    found = {v for v in utils.all_versions() if Version(v) >= OLDEST_KUBE}
    return sorted(found, key=Version)


# --------------------------------------------------------------------------- rendering


def manifests(rendered: dict[str, str]) -> list[dict]:
    out = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(d for d in yaml.safe_load_all(text) if d)
    return out


def render(values: dict | None = None, *, release: str = RELEASE) -> list[dict]:
    helm = _helm()
    with helm.Chart.load(str(CHART)) as chart:
        return manifests(chart.render(values or {}, name=release, namespace="lmcache"))


def render_error(values: dict) -> str:
    helm = _helm()
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmRenderError) as e:
        chart.render(values, name=RELEASE, namespace="lmcache")
    return str(e.value)


def kind(objs: list[dict], name: str) -> dict:
    found = [o for o in objs if o["kind"] == name]
    assert len(found) == 1, f"expected one {name}, got {[o['kind'] for o in objs]}"
    return found[0]


def server_container(objs: list[dict]) -> dict:
    return kind(objs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def validate(objs: list[dict], versions: list[str]) -> list[str]:
    """Every built-in object against the strict schemas of each version (CRDs are checked
    by their own tests: no schema for them ships offline)."""
    kv = _kv()
    problems = []
    for version in versions:
        for obj in objs:
            if obj["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                problems.append(f"{version} {obj['kind']}: {e.message} (at {where})")
    return problems


#: Value sets the chart is rendered with: every branch of its templates.
VALUE_SETS: dict[str, dict] = {
    "defaults": {},
    "service-monitor": {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"r": "p"}}}},
    "legacy-bearer-token": {
        "metrics": {"serviceMonitor": {"enabled": True, "legacyBearerTokenSecret": True}}
    },
    "existing-secret": {
        "auth": {"existingSecret": "my-secret", "key": "token", "keepOnUninstall": False},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "disk-tier-on-the-node": {
        "cacheConfig": {
            "max_local_cpu_size": "64GiB",
            "local_disk": "file:///var/lib/lmcache/disk/",
            "max_local_disk_size": "500GiB",
        }
    },
    "disk-tier-emptydir-and-redis": {
        "cacheConfig": {
            "local_disk": "file:///cache/disk",
            "max_local_disk_size": "50GiB",
            "remote_url": "redis://redis.lmcache.svc:6379",
            "remote_serde": "lz4",
            "remote_encryption": True,
        },
        "diskVolume": {"type": "emptyDir", "sizeLimit": "60Gi"},
        "server": {
            "env": [
                {
                    "name": "LMCACHE_REDIS_PASSWORD",
                    "valueFrom": {"secretKeyRef": {"name": "redis", "key": "password"}},
                }
            ]
        },
    },
    "no-secret": {"auth": {"enabled": False}, "metrics": {"service": {"enabled": False}}},
    "non-root-engines-and-scheduling": {
        "socket": {"gid": 2000, "dir": "/var/run/lmcache-a"},
        "server": {"extraArgs": ["--chunk-size", "512"], "logLevel": "DEBUG"},
        "resources": {"requests": {"cpu": "2", "memory": "40Gi"}, "limits": {"memory": "48Gi"}},
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "priorityClassName": "system-node-critical",
        "podAnnotations": {"a": "b"},
        "imagePullSecrets": [{"name": "regcred"}],
        "cacheConfig": {
            "tenant_quotas": {"team-a": "8GiB", "*": "2GiB"},
            "server_slot_size": "4MiB",
        },
    },
}


# --------------------------------------------------------------------------- what lmcache reads


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.ClassDef) and n.name == name for n in ast.walk(tree))


def _vllm_registers(name: str) -> bool | None:
    """Whether vLLM's connector factory registers ``name`` (None: vLLM is not installed).
    Read from its source: importing vLLM takes ~20 s."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    factory = Path(spec.submodule_search_locations[0]) / (
        "distributed/kv_transfer/kv_connector/factory.py"
    )
    return f'"{name}"' in factory.read_text()


def _env_names_in_sources() -> frozenset[str]:
    """``LMCACHE_*`` names written as string literals in lmcache's package sources (not
    their tests, test helpers or benchmarks), leaving out config_sources' list of names
    it merely tolerates: a variable counts as read only where code names it."""
    sources = [
        *ROOT.glob("packages/*/src/**/*.py"),
        *ROOT.glob("packages/*/hatch_build.py"),  # build-time variables (LMCACHE_BUILD_CUDA)
        *(ROOT / "src").rglob("*.py"),
    ]
    names: set[str] = set()
    for path in sources:
        parts = set(path.parts)
        if {"tests", "testing", "bench"} & parts or path.stem in ("testing", "soak"):
            continue
        tree = ast.parse(path.read_text())
        tolerated: set[int] = set()
        for node in ast.walk(tree):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == "_NON_KEY_ENV" for t in targets):
                tolerated.update(id(n) for n in ast.walk(node))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(r"LMCACHE_[A-Z0-9_]+", node.value)
                and id(node) not in tolerated
            ):
                names.add(node.value)
    return frozenset(names)


class Reads:
    """What lmcache's packages read, from their own code (nothing is copied here)."""

    def __init__(self) -> None:
        from lmcache_core import config_sources
        from lmcache_core.config import CacheConfig
        from lmcache_server import cli
        from lmcache_vllm import settings

        self.keys = frozenset(CacheConfig.keys())
        self.non_key_env = frozenset(config_sources._NON_KEY_ENV)
        self.env_read = _env_names_in_sources()
        self.compat = frozenset(config_sources.LMCACHE_COMPAT_KEYS)
        self.build_parser = cli.build_parser
        self.no_effect_flags = {"--" + f.replace("_", "-") for f in cli._NO_EFFECT}
        self.adapter_keys = frozenset(settings.ADAPTER_KEYS)
        self.ignored_extra = frozenset(settings.UPSTREAM_IGNORED_KEYS)

    # LMCACHE_* variables. compat_ok: upstream's names that lmcache accepts without
    # effect are fine (production-stack sets some whatever its values say).
    def env(self, name: str, *, compat_ok: bool = False) -> str | None:
        if not name.startswith("LMCACHE_"):
            return None
        if name in self.non_key_env:
            if name in self.env_read or compat_ok:
                return None
            return f"{name}: tolerated for upstream's sake, but nothing in lmcache reads it"
        key = name[len("LMCACHE_") :].lower()
        if key in self.keys or name in self.env_read:
            return None
        if compat_ok and key in self.compat:
            return None
        if key in self.compat:
            return f"{name}: upstream LMCache's key {key!r}, accepted but with no effect here"
        return f"{name}: not a cache config key, nor a variable lmcache reads"

    # cache config files
    def cache_config(self, values: dict, where: str) -> list[str]:
        from lmcache_core.config import CacheConfig
        from lmcache_core.errors import ConfigError

        problems = [
            f"{where}: {k!r} is not a cache config key" for k in values if k not in self.keys
        ]
        try:
            CacheConfig.from_dict(values, source=where)
        except ConfigError as e:
            problems.append(f"{where}: {e}")
        return problems

    # `lmcache server` argv (after `lmcache server`)
    def server_args(self, args: list[str], where: str) -> list[str]:
        problems = []
        parser = self.build_parser()
        parser.exit_on_error = False
        try:
            parsed, unknown = parser.parse_known_args(args)
        except (Exception, SystemExit) as e:  # argparse.ArgumentError, or its exit
            return [f"{where}: `lmcache server {' '.join(args)}`: {e}"]
        if unknown:
            problems.append(f"{where}: `lmcache server` has no flag(s) {unknown}")
        for a in args:
            if a.split("=")[0] in self.no_effect_flags:
                problems.append(f"{where}: {a} is accepted by `lmcache server` but has no effect")
        if parsed.config and not parsed.config.startswith("/"):
            problems.append(f"{where}: --config {parsed.config} is not an absolute path")
        return problems

    # --kv-transfer-config
    def kv_transfer(self, text: str, where: str) -> list[str]:
        try:
            tc = json.loads(text)
        except ValueError as e:
            return [f"{where}: --kv-transfer-config is not JSON ({e})"]
        problems = []
        name = tc.get("kv_connector")
        module = tc.get("kv_connector_module_path")
        shim = ROOT / "src" / "lmcache" / "integration" / "vllm"
        if name == "LMCacheKVConnector":
            import lmcache_vllm

            ok = module == "lmcache_vllm" and "LMCacheKVConnector" in lmcache_vllm.__all__
            ok = ok and _defines(
                ROOT / "packages/lmcache-vllm/src/lmcache_vllm/connector.py", "LMCacheKVConnector"
            )
            if not ok:
                problems.append(f"{where}: LMCacheKVConnector needs module path lmcache_vllm")
        elif name == "LMCacheMPConnector":
            if module not in (None, "lmcache.integration.vllm.lmcache_mp_connector"):
                problems.append(f"{where}: LMCacheMPConnector from {module}, not lmcache's shim")
            if not _defines(shim / "lmcache_mp_connector.py", "LMCacheMPConnector"):
                problems.append(f"{where}: lmcache's shim has no LMCacheMPConnector")
            if _vllm_registers(name) is False:
                problems.append(f"{where}: vLLM registers no connector {name}")
        elif name == "LMCacheConnectorV1":
            if module is not None or not _defines(
                shim / "vllm_v1_adapter.py", "LMCacheConnectorV1Impl"
            ):
                problems.append(f"{where}: LMCacheConnectorV1 is answered by lmcache's shim only")
            if _vllm_registers(name) is False:
                problems.append(f"{where}: vLLM registers no connector {name}")
        else:
            problems.append(f"{where}: kv_connector {name!r} is not lmcache's")
        if tc.get("kv_role") not in ("kv_both", "kv_producer", "kv_consumer"):
            problems.append(f"{where}: kv_role {tc.get('kv_role')!r}")
        for key in tc.get("kv_connector_extra_config") or {}:
            bare = key.removeprefix("lmcache.")
            if name == "LMCacheMPConnector" and key in ("lmcache.mp.host", "lmcache.mp.port"):
                continue
            if key.startswith("lmcache.mp."):
                problems.append(f"{where}: extra config {key}: not read by lmcache's MP connector")
            elif key in self.ignored_extra:
                problems.append(f"{where}: extra config {key}: upstream's, no effect here")
            elif not (
                bare in self.keys or key in self.adapter_keys or key == "discard_partial_chunks"
            ):
                problems.append(f"{where}: extra config {key}: not a key lmcache's connector reads")
        return problems


@pytest.fixture(scope="module")
def reads() -> Reads:
    return Reads()


def kv_transfer_arg(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--kv-transfer-config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--kv-transfer-config="):
            return a.split("=", 1)[1]
    return None


def containers(obj: Any, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every container (a mapping with an image, or with args and env) anywhere in ``obj``."""
    if isinstance(obj, dict):
        if "name" in obj and ("image" in obj or "args" in obj) and isinstance(obj.get("name"), str):
            yield path, obj
        for k, v in obj.items():
            yield from containers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from containers(v, f"{path}[{i}]")


def check_objects(objs: list[dict], reads: Reads, where: str) -> list[str]:
    """Every variable, server flag, connector setting and cache config in ``objs``."""
    problems = []
    for obj in objs:
        here = f"{where} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "ConfigMap":
            for key, text in (obj.get("data") or {}).items():
                if key.endswith((".yaml", ".yml")):
                    problems += reads.cache_config(yaml.safe_load(text) or {}, f"{here}:{key}")
        for path, c in containers(obj):
            for e in c.get("env") or []:
                if p := reads.env(e["name"]):
                    problems.append(f"{here}{path}: {p}")
            argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
            if any(argv[i : i + 2] == ["lmcache", "server"] for i in range(len(argv))):
                problems += reads.server_args(server_argv(c), f"{here}{path}")
            if (tc := kv_transfer_arg(argv)) is not None:
                problems += reads.kv_transfer(tc, f"{here}{path}")
    return problems


def server_argv(c: dict) -> list[str]:
    """The flags after `lmcache server` in a container (command and args together)."""
    argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    i = next(i for i in range(len(argv) - 1) if argv[i : i + 2] == ["lmcache", "server"])
    return argv[i + 2 :]


# --------------------------------------------------------------------------- the chart


def test_the_chart_lints_clean_for_every_kubernetes_version():
    helm = _helm()
    _kv()
    for version in kube_versions():
        report = helm.lint(str(CHART), strict=True, kube_version=f"v{version}")
        assert not report["errors"], (version, report)
        # Severity 1 is Helm's advice (an icon); 2 (warning) and 3 (error) fail.
        assert all(m["severity"] <= 1 for m in report["messages"]), (version, report)
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={OLDEST_KUBE}.0-0"
    from lmcache_server.version import __version__

    assert chart["appVersion"] == __version__, "appVersion is the server's version (the image tag)"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes_and_only_uses_what_lmcache_reads(name, reads):
    objs = render(VALUE_SETS[name])
    versions = kube_versions()
    # The defaults against every version; the other value sets against the oldest and newest.
    assert not validate(objs, versions if name == "defaults" else [versions[0], versions[-1]])
    assert not check_objects(objs, reads, name)
    kinds = sorted(o["kind"] for o in objs)
    assert "DaemonSet" in kinds and "ConfigMap" in kinds
    assert ("Secret" in kinds) == (name not in ("existing-secret", "no-secret"))
    assert ("ServiceMonitor" in kinds) == ("serviceMonitor" in json.dumps(VALUE_SETS[name]))


def test_the_server_pod_shares_its_socket_not_the_hosts_ipc_or_network():
    objs = render()
    pod = kind(objs, "DaemonSet")["spec"]["template"]["spec"]
    for flag in ("hostIPC", "hostNetwork", "hostPID"):
        assert not pod.get(flag), flag
    c = server_container(objs)
    args = server_argv(c)
    assert args[args.index("--socket") + 1] == SOCKET
    assert args[args.index("--socket-mode") + 1] == "660"
    socket_volume = next(v for v in pod["volumes"] if v["name"] == "socket")
    assert socket_volume["hostPath"] == {"path": SOCKET_DIR, "type": "DirectoryOrCreate"}
    assert {"name": "socket", "mountPath": SOCKET_DIR} in c["volumeMounts"]
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsUser"] == 0  # owns the socket in the node's root dir
    # No /dev/shm volume: the arena is a memfd passed over the socket.
    assert not any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])
    assert kind(objs, "DaemonSet")["spec"]["updateStrategy"]["rollingUpdate"] == {
        "maxUnavailable": 1
    }


SIZES = ["20GiB", "512MB", "1.5", 4, 0.5, "7 gb", "1TiB", "300MiB", "2.5e1GiB", "1024KiB", "64G"]


@pytest.mark.parametrize("size", SIZES, ids=[str(s) for s in SIZES])
def test_the_memory_request_is_the_arena_lmcache_reads_plus_headroom(size):
    from lmcache_core.sizes import parse_size

    objs = render({"cacheConfig": {"max_local_cpu_size": size}})
    ds = kind(objs, "DaemonSet")
    arena = int(ds["spec"]["template"]["metadata"]["annotations"]["lmcache/arena-bytes"])
    assert arena == parse_size(size), "the chart reads sizes as lmcache does"
    want = f"{math.ceil((arena + GIB) / MIB)}Mi"
    resources = server_container(objs)["resources"]
    assert resources["requests"]["memory"] == want
    assert resources["limits"]["memory"] == want


def test_the_arena_default_is_lmcaches_default():
    from lmcache_core.config import CacheConfig

    objs = render({"cacheConfig": {"max_local_cpu_size": None}})
    annotations = kind(objs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["lmcache/arena-bytes"]) == CacheConfig().max_local_cpu_size


def test_a_memory_limit_below_the_arena_fails_rendering_with_the_fix():
    # 20 GiB arena + 1 GiB headroom = 21504 MiB.
    for which in ("limits", "requests"):
        msg = render_error({"resources": {which: {"memory": "16Gi"}}})
        assert f"resources.{which}.memory=16Gi is below what the lmcache server needs" in msg
        assert "21504Mi" in msg and "max_local_cpu_size=20GiB" in msg and "OOMKilled" in msg
        msg = render_error({"resources": {which: {"memory": f"{21504 * MIB - 1}"}}})
        assert "21504Mi" in msg
    ok = server_container(render({"resources": {"limits": {"memory": "21504Mi"}}}))
    assert ok["resources"]["limits"]["memory"] == "21504Mi"
    bigger = server_container(render({"resources": {"limits": {"memory": "32Gi"}}}))
    assert bigger["resources"] == {
        "requests": {"cpu": "1", "memory": "21504Mi"},
        "limits": {"memory": "32Gi"},
    }
    # A headroom of nothing still counts the arena.
    assert "is below" in render_error(
        {"resources": {"memoryHeadroom": "0", "limits": {"memory": "19Gi"}}}
    )


@pytest.mark.parametrize("size", ["7 XB", True, "-1GiB", "five"], ids=str)
def test_a_size_lmcache_refuses_fails_rendering_too(size):
    from lmcache_core.sizes import parse_size

    with pytest.raises(ValueError):
        parse_size(size)
    assert "cacheConfig.max_local_cpu_size" in render_error(
        {"cacheConfig": {"max_local_cpu_size": size}}
    )


def test_the_configmap_is_the_users_cache_yaml_plus_the_socket(reads):
    from lmcache_core.config import CacheConfig

    mine = {
        "chunk_size": 512,
        "max_local_cpu_size": "80GiB",
        "hash_algorithm": "sha256",
        "max_chunk_aliases": 262144,
        "pin_timeout": 120.5,
        "tenant_quotas": {"team-a": "20GiB", "*": "4GiB", "": "8GiB"},
        "local_disk": "file:///var/lib/lmcache/disk",
        "max_local_disk_size": "1TiB",
        "save_unfull_chunk": False,
    }
    objs = render({"cacheConfig": mine})
    text = kind(objs, "ConfigMap")["data"]["cache.yaml"]
    assert yaml.safe_load(text) == {**mine, "server_url": f"unix://{SOCKET}"}
    assert CacheConfig.from_dict(yaml.safe_load(text)) == CacheConfig.from_dict(
        {**mine, "server_url": f"unix://{SOCKET}"}
    )
    assert not reads.cache_config(yaml.safe_load(text), "cache.yaml")
    c = server_container(objs)
    assert server_argv(c)[:2] == ["--config", "/etc/lmcache/config/cache.yaml"]
    assert {"name": "config", "mountPath": "/etc/lmcache/config", "readOnly": True} in c[
        "volumeMounts"
    ]
    # The disk tier's folder is a volume at local_disk's path.
    disk = next(m for m in c["volumeMounts"] if m["name"] == "disk")
    assert disk["mountPath"] == "/var/lib/lmcache/disk"


def test_the_chart_refuses_what_lmcache_refuses_before_anything_runs():
    from lmcache_core.config_sources import SECRET_KEYS

    for key in sorted(SECRET_KEYS):
        assert "never goes in the cache config" in render_error({"cacheConfig": {key: "x" * 32}})
    assert "the chart sets it" in render_error({"cacheConfig": {"auth_secret_file": "/s"}})
    assert "listens on unix:///run/lmcache/lmcache.sock" in render_error(
        {"cacheConfig": {"server_url": "tcp://localhost:5555"}}
    )
    assert "absolute path" in render_error({"cacheConfig": {"local_disk": "file://disk/"}})
    assert "needs auth.enabled" in render_error({"auth": {"enabled": False}})
    assert "needs auth.enabled" in render_error(
        {"auth": {"enabled": False}, "metrics": {"service": {"enabled": False},
                                                 "serviceMonitor": {"enabled": True}}}
    )  # fmt: skip


def test_without_the_secret_the_admin_endpoint_stays_on_loopback():
    c = server_container(render(VALUE_SETS["no-secret"]))
    args = server_argv(c)
    assert args[args.index("--http-host") + 1] == "127.0.0.1"
    assert "env" not in c
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "127.0.0.1:8080/healthcheck" in " ".join(c[probe]["exec"]["command"])
    with_secret = server_container(render())
    args = server_argv(with_secret)
    assert args[args.index("--http-host") + 1] == "0.0.0.0"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert with_secret[probe]["httpGet"] == {"path": "/healthcheck", "port": "admin"}
    # The startup probe allows 60 s + 2 s per GiB of arena (20 GiB: 100 s, 20 x 5 s).
    assert with_secret["startupProbe"]["failureThreshold"] == 20


def test_the_service_monitor_scrapes_metrics_with_the_secret_as_bearer_token():
    objs = render(VALUE_SETS["service-monitor"])
    sm, svc, secret = kind(objs, "ServiceMonitor"), kind(objs, "Service"), kind(objs, "Secret")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["r"] == "p"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["lmcache"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == svc["spec"]["ports"][0]["name"] == "admin"
    assert endpoint["path"] == "/metrics"
    ref = {"name": secret["metadata"]["name"], "key": "auth-secret"}
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": ref}
    legacy = kind(render(VALUE_SETS["legacy-bearer-token"]), "ServiceMonitor")
    assert legacy["spec"]["endpoints"][0]["bearerTokenSecret"] == ref
    existing = kind(render(VALUE_SETS["existing-secret"]), "ServiceMonitor")
    creds = existing["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert creds == {"name": "my-secret", "key": "token"}
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert svc["spec"]["selector"] == kind(objs, "DaemonSet")["spec"]["selector"]["matchLabels"]


class _FakeAPIServer:
    """A Kubernetes API server on loopback that knows one Secret: enough for Helm's
    `lookup` (what `helm upgrade` asks the cluster)."""

    def __init__(self, secret: dict) -> None:
        paths = {
            "/api/v1": {
                "kind": "APIResourceList",
                "groupVersion": "v1",
                "resources": [
                    {"name": "secrets", "singularName": "secret", "namespaced": True,
                     "kind": "Secret", "verbs": ["get", "list"]},
                ],
            },
            f"/api/v1/namespaces/lmcache/secrets/{secret['metadata']['name']}": secret,
        }  # fmt: skip
        self.seen: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                outer.seen.append(path)
                body = paths.get(path)
                code = 200 if body is not None else 404
                if body is None:
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "reason": "NotFound", "code": 404}  # fmt: skip
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def kubeconfig(self) -> str:
        port = self.httpd.server_address[1]
        return yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u"}}],
                "current-context": "c",
            }
        )

    def __enter__(self) -> _FakeAPIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_secret_is_generated_once_and_kept_across_upgrades():
    helm = _helm()
    first = kind(render(), "Secret")
    value = base64.b64decode(first["data"]["auth-secret"])
    assert re.fullmatch(rb"[A-Za-z0-9]{64}", value)
    assert first["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    # Offline there is no earlier secret: each render draws a new one...
    assert kind(render(), "Secret")["data"] != first["data"]
    # ...while an upgrade finds the release's Secret and keeps it.
    with _FakeAPIServer(first) as api:
        with (
            helm.Config(namespace="lmcache", kubeconfig_content=api.kubeconfig()) as cfg,
            helm.Chart.load(str(CHART)) as chart,
        ):
            again = kind(
                manifests(
                    cfg.render(chart, {}, name=RELEASE, namespace="lmcache", is_upgrade=True)
                ),
                "Secret",
            )
        assert f"/api/v1/namespaces/lmcache/secrets/{RELEASE}-auth" in api.seen
    assert again["data"] == first["data"]
    # A Secret of the user's: no Secret rendered, theirs mounted.
    objs = render(VALUE_SETS["existing-secret"])
    pod = kind(objs, "DaemonSet")["spec"]["template"]["spec"]
    auth = next(v for v in pod["volumes"] if v["name"] == "auth")
    assert auth["secret"]["secretName"] == "my-secret"
    assert auth["secret"]["items"] == [{"key": "token", "path": "token"}]
    env = {e["name"]: e["value"] for e in server_container(objs)["env"]}
    assert env == {"LMCACHE_AUTH_SECRET_FILE": "/etc/lmcache/auth/token"}


# --------------------------------------------------------------------------- running it


def _remap(value: str, mounts: dict[str, str]) -> str:
    """A path in a container, as the host directory mounted there names it."""
    for inside in sorted(mounts, key=len, reverse=True):
        if value == inside or value.startswith(inside.rstrip("/") + "/"):
            return mounts[inside] + value[len(inside) :]
        if inside in value and value.startswith("unix://"):
            return value.replace(inside, mounts[inside], 1)
    return value


def _http(url: str, token: str | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _Running:
    """`lmcache server` started from a container's command, args and env, with the
    container's paths mapped to the host folders mounted there."""

    def __init__(self, argv: list[str], env: dict[str, str], mounts: dict[str, str], log: Path):
        assert argv[0] == "lmcache", argv
        self.argv = [sys.executable, "-m", "lmcache_core", *(_remap(a, mounts) for a in argv[1:])]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")}
        self.env.update({k: _remap(v, mounts) for k, v in env.items()})
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> _Running:
        import time

        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + 60
        while "lmcache server ready" not in self.log.read_text():
            assert self.proc.poll() is None, f"the server exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        return self

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def _store_and_load_through(url: str, chunk_size: int) -> None:
    """An engine on the server at ``url`` stores a prompt and another loads it back."""
    from lmcache_core.testing.paged_memory import PagedKVMemory
    from lmcache_server.testing import client_engine

    tokens = list(range(2 * chunk_size))
    with_cfg = {"chunk_size": chunk_size}
    writer = client_engine(url, with_cfg, timeout=5.0)
    src = PagedKVMemory(writer.layout, num_blocks=256, seed=1)
    table = src.table(len(tokens), 0)
    assert writer.store(tokens, src.kv(table)) == len(tokens)
    reader = client_engine(url, with_cfg, timeout=5.0)
    dst = PagedKVMemory(reader.layout, num_blocks=256, seed=2)
    table2 = dst.table(len(tokens), 1)
    assert reader.retrieve(tokens, dst.kv(table2)) == len(tokens)
    assert dst.tokens_kv(table2, 0, len(tokens)) == src.tokens_kv(table, 0, len(tokens))
    writer.close()
    reader.close()


def test_the_server_runs_as_the_chart_renders_it(tmp_path):
    """The DaemonSet's container, run here: its flags, its ConfigMap as the config file,
    its Secret as the secret file. The kubelet's probe, Prometheus with the bearer token
    and an engine on the socket all get what the chart promises."""
    from lmcache_core.testing.servers import free_port
    from lmcache_server.testing import private_dir

    port = free_port()
    objs = render({"cacheConfig": {"max_local_cpu_size": "64MiB"}, "admin": {"port": port}})
    c = server_container(objs)
    pod = kind(objs, "DaemonSet")["spec"]["template"]["spec"]
    mounts: dict[str, str] = {}
    for m in c["volumeMounts"]:
        volume = next(v for v in pod["volumes"] if v["name"] == m["name"])
        host = tmp_path / m["name"]
        if "configMap" in volume:
            host.mkdir()
            for k, v in kind(objs, "ConfigMap")["data"].items():
                (host / k).write_text(v)
        elif "secret" in volume:
            host.mkdir()
            data = kind(objs, "Secret")["data"]
            for item in volume["secret"]["items"]:
                (host / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
                os.chmod(host / item["path"], volume["secret"]["defaultMode"])
        elif "hostPath" in volume:
            host = Path(private_dir())  # the node's root-owned, 0755 directory
        else:
            host.mkdir()
        mounts[m["mountPath"]] = str(host)
    env = {e["name"]: e["value"] for e in c["env"]}
    token = base64.b64decode(kind(objs, "Secret")["data"]["auth-secret"]).decode()
    with _Running(c["command"] + c["args"], env, mounts, tmp_path / "server.log") as server:
        base = f"http://127.0.0.1:{port}"
        assert _http(base + c["livenessProbe"]["httpGet"]["path"]) == (
            200,
            b'{"status": "healthy"}',
        )
        assert _http(base + "/metrics")[0] == 401  # off loopback: the secret is required
        url = yaml.safe_load(kind(objs, "ConfigMap")["data"]["cache.yaml"])["server_url"]
        _store_and_load_through(_remap(url, mounts), 256)
        code, body = _http(base + "/metrics", token=token)  # what the ServiceMonitor sends
        assert code == 200 and b"lmcache:server_sessions" in body
        assert server.stop() == 0
    assert not os.path.exists(_remap(SOCKET, mounts)), "SIGTERM removes the socket"


# --------------------------------------------------------------------------- recipes


def engine_cache_config(monkeypatch, env: dict[str, str], argv: list[str]) -> Any:
    """The cache config an engine resolves from its variables and --kv-transfer-config,
    as lmcache's vLLM connector (or its LMCacheMPConnector shim) resolves it."""
    from lmcache_vllm.settings import load_cache_config

    for k in list(os.environ):
        if k.startswith("LMCACHE_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    tc = json.loads(kv_transfer_arg(argv) or "{}")
    extra = dict(tc.get("kv_connector_extra_config") or {})
    if tc["kv_connector"] == "LMCacheMPConnector":
        extra = _mp_shim(monkeypatch).mp_extra_config(extra)
    return load_cache_config(extra)


def _mp_shim(monkeypatch) -> types.ModuleType:
    """lmcache's LMCacheMPConnector module, loaded without vLLM (which takes ~20 s to
    import) and without asking a server for its chunk size."""
    if "lmcache_vllm.connector" not in sys.modules:
        stub = types.ModuleType("lmcache_vllm.connector")
        stub.LMCacheKVConnector = object  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "lmcache_vllm.connector", stub)
    path = ROOT / "src" / "lmcache" / "integration" / "vllm" / "lmcache_mp_connector.py"
    spec = importlib.util.spec_from_file_location("_lmcache_mp_connector_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def unreachable(*args: Any, **kwargs: Any) -> dict:
        raise OSError("no server in this test")

    module.server_about = unreachable  # type: ignore[attr-defined]
    return module


def check_engine_pod(
    monkeypatch, tmp_path: Path, reads: Reads, container: dict, volumes: list[dict], where: str
) -> Any:
    """An engine container of a recipe on the node's server: its socket directory is the
    chart's hostPath, its config the chart's ConfigMap, and the cache config it resolves
    names the chart's socket. Returns that config."""
    mounts = {m["name"]: m for m in container.get("volumeMounts") or []}
    by_name = {v["name"]: v for v in volumes}
    socket_mount = next(m for m in mounts.values() if m["mountPath"] == SOCKET_DIR)
    assert socket_mount.get("readOnly") is True, f"{where}: mount the socket's folder read-only"
    assert by_name[socket_mount["name"]]["hostPath"] == {
        "path": SOCKET_DIR,
        "type": "DirectoryOrCreate",
    }, where
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    files: dict[str, str] = {}
    chart_cm = kind(render(), "ConfigMap")
    for m in mounts.values():
        v = by_name[m["name"]]
        if "configMap" in v:
            assert v["configMap"]["name"] == chart_cm["metadata"]["name"], where
            for k, text in chart_cm["data"].items():
                files[f"{m['mountPath']}/{k}"] = text
    real_env = {}
    for k, v in env.items():
        if v is None or not k.startswith("LMCACHE_"):
            continue
        assert not reads.env(k), f"{where}: {reads.env(k)}"
        if k == "LMCACHE_CONFIG_FILE":
            assert v in files, f"{where}: LMCACHE_CONFIG_FILE={v} is not a mounted ConfigMap key"
            host = tmp_path / "engine-cache.yaml"
            host.write_text(files[v])
            v = str(host)
        real_env[k] = v
    argv = [str(a) for a in (container.get("command") or []) + (container.get("args") or [])]
    tc = kv_transfer_arg(argv)
    assert tc is not None, f"{where}: no --kv-transfer-config"
    assert not reads.kv_transfer(tc, where)
    config = engine_cache_config(monkeypatch, real_env, argv)
    assert config.server_url == f"unix://{SOCKET}", f"{where}: the engine's server is elsewhere"
    return config


#: production-stack's engine template (helm/templates/deployment-vllm-multi.yaml at
#: vllm-project/production-stack@a6c01db, 2026-08-05): the LMCACHE_* variables each
#: `lmcacheConfig` key sets, the ones set whenever lmcacheConfig is present, and the
#: connector it passes. Facts, for the test that runs without production-stack's chart;
#: test_production_stack_renders_the_recipes checks them against the real chart.
PS_LMCACHE_ENV = {
    "enabled": {"LMCACHE_USE_EXPERIMENTAL": "True"},
    "logLevel": {"LMCACHE_LOG_LEVEL": None},
    "cpuOffloadingBufferSize": {"LMCACHE_LOCAL_CPU": "True", "LMCACHE_MAX_LOCAL_CPU_SIZE": None},
    "diskOffloadingBufferSize": {"LMCACHE_MAX_LOCAL_DISK_SIZE": None},
    "kvRole": {},
}
PS_ALWAYS = {"LMCACHE_LMCACHE_INSTANCE_ID": "vllm-llama-deployment-vllm-0"}
#: Upstream's variables production-stack's template sets whatever a recipe says
#: (lmcache accepts them, without effect).
PS_FORCED = {"LMCACHE_LMCACHE_INSTANCE_ID", "LMCACHE_USE_EXPERIMENTAL", "LMCACHE_LOG_LEVEL"}
PS_CONNECTOR = "LMCacheConnectorV1"


def _ps_values(name: str) -> dict:
    return yaml.safe_load((RECIPES / "production-stack" / name).read_text())


def _ps_engine_env(spec: dict) -> dict[str, str | None]:
    """The LMCACHE_* variables production-stack's template gives this modelSpec."""
    env: dict[str, str | None] = {}
    lm = spec.get("lmcacheConfig")
    if lm:
        for key, value in lm.items():
            assert key in PS_LMCACHE_ENV, f"lmcacheConfig.{key} is not a key we know the effect of"
            for var, fixed in PS_LMCACHE_ENV[key].items():
                env[var] = fixed if fixed is not None else str(value)
        if lm.get("enabled"):
            env.setdefault("LMCACHE_LOG_LEVEL", "INFO")
        env.update(PS_ALWAYS)
    for e in spec.get("env") or []:
        env[e["name"]] = e.get("value")
    return env


def _quantity(q: str) -> int:
    units = {"Ki": 1 << 10, "Mi": MIB, "Gi": GIB, "Ti": 1 << 40}
    m = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|Ti)?", str(q))
    assert m, q
    return int(float(m.group(1)) * units.get(m.group(2) or "", 1))


def test_production_stack_in_process_recipe_uses_its_keys_and_lmcache_reads_them(
    monkeypatch, reads
):
    from lmcache_core.sizes import parse_size

    (spec,) = _ps_values("values-inprocess.yaml")["servingEngineSpec"]["modelSpec"]
    assert spec["vllmConfig"]["enablePrefixCaching"] is True  # else production-stack turns it off
    env = _ps_engine_env(spec)
    for name in env:
        assert not reads.env(name, compat_ok=name in PS_FORCED), reads.env(name)
    argv = [
        "--kv-transfer-config",
        json.dumps({"kv_connector": PS_CONNECTOR, "kv_role": "kv_both"}),
    ]
    assert not reads.kv_transfer(argv[1], "production-stack")
    config = engine_cache_config(monkeypatch, {k: v for k, v in env.items() if v}, argv)
    arena = parse_size(spec["lmcacheConfig"]["cpuOffloadingBufferSize"])
    assert config.max_local_cpu_size == arena == 20 * GIB and config.server_url is None
    # The arena is in the engine's pod: its memory covers it (production-stack#923).
    for key in ("requestMemory", "limitMemory"):
        assert _quantity(spec[key]) >= arena + 8 * GIB, f"{key} must hold the arena and vLLM"
    assert spec["repository"] != "lmcache/vllm-openai", "upstream's image, not ours"


def test_production_stack_server_recipe_points_its_engines_at_the_nodes_socket(
    monkeypatch, tmp_path, reads
):
    (spec,) = _ps_values("values-server.yaml")["servingEngineSpec"]["modelSpec"]
    assert "lmcacheConfig" not in spec, "its keys configure the in-process mode only"
    assert spec["vllmConfig"]["enablePrefixCaching"] is True
    container = {
        "name": "vllm",
        "args": spec["vllmConfig"]["extraArgs"],
        "env": spec["env"],
        "volumeMounts": spec["extraVolumeMounts"],
    }
    config = check_engine_pod(
        monkeypatch, tmp_path, reads, container, spec["extraVolumes"], "ps-server"
    )
    assert config.chunk_size == 256
    assert json.loads(kv_transfer_arg(container["args"]))["kv_connector"] == "LMCacheMPConnector"


def _production_stack_chart(tmp_path: Path) -> Path:
    src = os.environ.get("PRODUCTION_STACK_CHART")
    if not src:
        pytest.skip(
            "set PRODUCTION_STACK_CHART to a production-stack checkout's helm/ folder to render "
            "the recipes with its real chart (its subcharts are left out)"
        )
    import shutil

    dst = tmp_path / "vllm-stack"
    shutil.copytree(src, dst)
    meta = yaml.safe_load((dst / "Chart.yaml").read_text())
    meta.pop("dependencies", None)  # kube-prometheus-stack etc.: off by default, not needed
    (dst / "Chart.yaml").write_text(yaml.safe_dump(meta))
    (dst / "Chart.lock").unlink(missing_ok=True)
    return dst


@pytest.mark.parametrize("recipe", ["values-inprocess.yaml", "values-server.yaml"])
def test_production_stack_renders_the_recipes(recipe, tmp_path, monkeypatch, reads):
    helm = _helm()
    chart_dir = _production_stack_chart(tmp_path)
    with helm.Chart.load(str(chart_dir)) as chart:
        objs = manifests(chart.render(_ps_values(recipe), name="vllm", namespace="lmcache"))
    (deployment,) = [
        o
        for o in objs
        if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("deployment-vllm")
    ]
    versions = kube_versions()
    assert not validate([deployment], [versions[0], versions[-1]])
    pod = deployment["spec"]["template"]["spec"]
    (c,) = [c for c in pod["containers"] if c["name"] == "vllm"]
    argv = [str(a) for a in c["command"] + (c.get("args") or [])]
    assert "--enable-prefix-caching" in argv
    # The facts above, against the real template.
    (spec,) = _ps_values(recipe)["servingEngineSpec"]["modelSpec"]
    rendered = {e["name"] for e in c["env"] if e["name"].startswith("LMCACHE_")}
    assert rendered == {k for k in _ps_engine_env(spec) if k.startswith("LMCACHE_")}
    for name in rendered:
        assert not reads.env(name, compat_ok=name in PS_FORCED), reads.env(name)
    if recipe == "values-server.yaml":
        check_engine_pod(monkeypatch, tmp_path, reads, c, pod["volumes"], "production-stack")
    else:
        assert json.loads(kv_transfer_arg(argv))["kv_connector"] == PS_CONNECTOR


#: llm-d's vLLM model server as its tiered-prefix-cache guide's base leaves it
#: (llm-d/llm-d guides/tiered-prefix-cache/modelserver/gpu/vllm/base, 2026): the
#: Deployment the recipe's patch applies to, reduced to what the patch touches.
LLM_D_BASE = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "decode"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"llm-d.ai/role": "decode"}},
        "template": {
            "metadata": {"labels": {"llm-d.ai/role": "decode"}},
            "spec": {
                "containers": [
                    {
                        "name": "modelserver",
                        "image": "vllm/vllm-openai:v0.23.0",
                        "command": ["vllm", "serve"],
                        "args": ["Qwen/Qwen3-32B", "--tensor-parallel-size=2"],
                        "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
                            "name": "llm-d-hf-token", "key": "HF_TOKEN"}}}],
                        "resources": {
                            "limits": {"memory": "400Gi", "nvidia.com/gpu": 2},
                            "requests": {"memory": "200Gi", "nvidia.com/gpu": 2},
                        },
                        "volumeMounts": [{"mountPath": "/dev/shm", "name": "shm"}],
                    }
                ],
                "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory"}}],
            },
        },
    },
}  # fmt: skip

_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def strategic_merge(base: Any, patch: Any, field: str = "") -> Any:
    """kubectl's strategic merge for the fields a Deployment patch uses: lists of
    containers, env, volumes, volumeMounts, ports merge by key; other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = strategic_merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        out = [copy.deepcopy(b) for b in base]
        for p in patch:
            i = next((i for i, b in enumerate(out) if b.get(key) == p.get(key)), None)
            if i is None:
                out.append(copy.deepcopy(p))
            else:
                out[i] = strategic_merge(out[i], p, "")
        return out
    return copy.deepcopy(patch)


def test_the_llm_d_patch_makes_a_valid_deployment_on_the_nodes_server(monkeypatch, tmp_path, reads):
    folder = RECIPES / "llm-d" / "lmcache-server"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../base"]
    assert [p["path"] for p in kustomization["patches"]] == ["patch-vllm.yaml"]
    (image,) = kustomization["images"]
    assert image["name"] == "vllm/vllm-openai"  # the base's image, replaced by ours
    patch = yaml.safe_load((folder / "patch-vllm.yaml").read_text())
    assert patch["metadata"]["name"] == LLM_D_BASE["metadata"]["name"]
    deployment = strategic_merge(LLM_D_BASE, patch)
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    c["image"] = f"{image['newName']}:{image['newTag']}"
    assert not validate([deployment], kube_versions())
    assert not check_objects([deployment], reads, "llm-d")
    assert c["args"][0] == "Qwen/Qwen3-32B", "args are replaced whole: the model stays first"
    assert {e["name"] for e in c["env"]} >= {"HF_TOKEN", "LMCACHE_SERVER_URL"}
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    check_engine_pod(monkeypatch, tmp_path, reads, c, volumes, "llm-d")


def test_the_kserve_inferenceservice_runs_vllm_on_the_nodes_server(monkeypatch, tmp_path, reads):
    (isvc,) = [
        d for d in yaml.safe_load_all((RECIPES / "kserve" / "inferenceservice.yaml").read_text())
    ]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    # hostPath volumes need raw (Standard) deployment mode.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    (c,) = predictor["containers"]
    assert c["name"] == "kserve-container"
    # The predictor is a pod spec (KServe inlines corev1.PodSpec): validate it as one.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": isvc["metadata"]["name"]},
        "spec": {"containers": predictor["containers"], "volumes": predictor["volumes"]},
    }
    assert not validate([pod], kube_versions())
    assert not check_objects([pod], reads, "kserve")
    assert "--enable-prefix-caching" in c["args"]
    check_engine_pod(monkeypatch, tmp_path, reads, c, predictor["volumes"], "kserve")


_PODMAN_VALUED = {"--name", "--network", "--memory", "-v", "--volume", "-e", "--env", "-p",
                  "--publish", "--device", "--restart", "--entrypoint", "--shm-size",
                  "--ipc"}  # fmt: skip
_PODMAN_FLAGS = {"-d", "--detach", "--rm"}


def _podman_run(argv: list[str]) -> dict:
    """`podman run` argv as options, image and command."""
    assert argv[0] == "run", argv
    out: dict[str, Any] = {"opts": {}, "volumes": {}, "env": {}}
    i = 1
    while argv[i].startswith("-"):
        opt, _, value = argv[i].partition("=")
        if opt in _PODMAN_FLAGS:
            i += 1
            continue
        assert opt in _PODMAN_VALUED, f"podman option {opt} unknown to this test"
        if not _:
            i += 1
            value = argv[i]
        if opt in ("-v", "--volume"):
            host, inside, *_mode = value.split(":")
            out["volumes"][inside] = host
        elif opt in ("-e", "--env"):
            name, eq, v = value.partition("=")
            out["env"][name] = v if eq else None
        else:
            out["opts"][opt] = value
        i += 1
    entrypoint = [out["opts"]["--entrypoint"]] if "--entrypoint" in out["opts"] else []
    out["image"], out["command"] = argv[i], entrypoint + argv[i + 1 :]
    return out


def test_the_podman_pair_runs_a_server_that_its_vllm_reaches(tmp_path, monkeypatch, reads):
    from lmcache_core.testing.servers import free_port
    from lmcache_server.testing import private_dir

    record = tmp_path / "podman.jsonl"
    fake = tmp_path / "podman"
    fake.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "with open(os.environ['PODMAN_RECORD'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    socket_dir, config_dir = private_dir(), tmp_path / "etc"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LMCACHE_")},
        "PODMAN": str(fake),
        "PODMAN_RECORD": str(record),
        "SOCKET_DIR": socket_dir,
        "CONFIG_DIR": str(config_dir),
        "ARENA_GIB": "1",
    }
    subprocess.run(["bash", str(RECIPES / "podman" / "run.sh")], env=env, check=True)
    server, engine = (_podman_run(json.loads(line)) for line in record.read_text().splitlines())
    assert server["opts"]["--name"] == "lmcache-server" and engine["opts"]["--name"] == "vllm"
    # The server's memory limit holds its arena (resident at start) and headroom.
    assert server["opts"]["--memory"] == "2g"
    # The server's command whatever the image's entrypoint; the engine keeps `vllm serve`.
    assert server["opts"]["--entrypoint"] == "lmcache" and "--entrypoint" not in engine["opts"]
    assert server["volumes"] == {SOCKET_DIR: socket_dir,
                                 "/etc/lmcache/cache.yaml": f"{config_dir}/cache.yaml"}  # fmt: skip
    assert engine["volumes"][SOCKET_DIR] == socket_dir
    # The arena is a memfd passed over the socket: no shared IPC namespace, and no
    # /dev/shm for the server (the engine's --shm-size is vLLM's own).
    assert not {"--ipc", "--shm-size"} & set(server["opts"]) and "--ipc" not in engine["opts"]
    config_text = (config_dir / "cache.yaml").read_text()
    assert not reads.cache_config(yaml.safe_load(config_text), "podman cache.yaml")
    # The engine: the image's entrypoint is `vllm serve`, so its command is the model and flags.
    assert not reads.kv_transfer(kv_transfer_arg(engine["command"]), "podman vllm")
    for name in engine["env"]:
        assert not reads.env(name), reads.env(name)
    engine_env = {k: _remap(v, engine["volumes"]) for k, v in engine["env"].items() if v}
    config = engine_cache_config(monkeypatch, engine_env, engine["command"])
    assert config.server_url == f"unix://{SOCKET}"
    # The server, as the recipe starts it (the admin port moved off 8080 for this test).
    assert server["command"][:2] == ["lmcache", "server"]
    assert not reads.server_args(server["command"][2:], "podman lmcache-server")
    argv = [*server["command"], "--http-port", str(free_port())]
    with _Running(argv, {}, server["volumes"], tmp_path / "server.log") as running:
        _store_and_load_through(_remap(config.server_url, engine["volumes"]), config.chunk_size)
        assert running.stop() == 0


# --------------------------------------------------------------------------- one source of truth


def test_a_name_renamed_in_lmcache_fails_these_checks(monkeypatch, reads):
    """The checks read names from lmcache's code: rename one there and they fail."""
    from lmcache_core.config import CacheConfig

    objs = render()
    assert not check_objects(objs, reads, "chart")
    renamed = tuple(k for k in CacheConfig.keys() if k not in ("auth_secret_file", "chunk_size"))
    monkeypatch.setattr(CacheConfig, "keys", classmethod(lambda cls: renamed))
    problems = check_objects(objs, Reads(), "chart")
    assert any("LMCACHE_AUTH_SECRET_FILE" in p for p in problems), problems
    assert any("'chunk_size' is not a cache config key" in p for p in problems), problems
    monkeypatch.undo()

    from lmcache_server import cli

    real = cli.build_parser

    def without_socket_mode():
        p = real()
        p._actions = [a for a in p._actions if "--socket-mode" not in a.option_strings]
        p._option_string_actions.pop("--socket-mode")
        return p

    monkeypatch.setattr(cli, "build_parser", without_socket_mode)
    problems = check_objects(objs, Reads(), "chart")
    assert any("--socket-mode" in p for p in problems), problems
    monkeypatch.undo()

    # A variable that is not a config key counts only where lmcache's code names it.
    assert {"LMCACHE_CONFIG_FILE", "LMCACHE_AUTH_SECRET", "LMCACHE_SOCKET_DIR"} <= reads.env_read
    assert reads.env("LMCACHE_LOG_LEVEL"), "upstream's, tolerated: nothing here reads it"
    assert not reads.env("LMCACHE_LOG_LEVEL", compat_ok=True)
    unread = copy.copy(reads)
    unread.env_read = reads.env_read - {"LMCACHE_CONFIG_FILE"}
    llm_d = strategic_merge(
        LLM_D_BASE, yaml.safe_load((RECIPES / "llm-d/lmcache-server/patch-vllm.yaml").read_text())
    )
    assert not check_objects([llm_d], reads, "llm-d")
    problems = check_objects([llm_d], unread, "llm-d")
    assert any("LMCACHE_CONFIG_FILE" in p for p in problems), problems


def test_every_lmcache_variable_named_in_deploy_and_its_doc_is_one_lmcache_reads(reads):
    files = [p for p in (ROOT / "deploy").rglob("*") if p.is_file()] + [DOC]
    found = {}
    for path in files:
        for name in re.findall(r"\bLMCACHE_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            found.setdefault(name, path.relative_to(ROOT))
    assert "LMCACHE_SERVER_URL" in found and "LMCACHE_AUTH_SECRET_FILE" in found
    # Upstream's names production-stack sets are accepted (with a warning), and named in the doc.
    bad = {n: str(p) for n, p in found.items() if reads.env(n, compat_ok=True)}
    assert not bad, bad


def test_the_doc_is_linked_from_the_readme_and_covers_every_recipe():
    readme = (ROOT / "README.md").read_text()
    assert "docs/deployment.md" in readme
    doc = DOC.read_text()
    for path in [CHART, *sorted(p for p in RECIPES.rglob("*") if p.is_file())]:
        assert str(path.relative_to(ROOT)) in doc, f"{path.relative_to(ROOT)} is not in the doc"
    assert "--dry-run" in doc and "no cluster" in doc.lower()


def doc_blocks() -> list[tuple[str, str]]:
    """The doc's fenced blocks as (language, text), indented ones dedented."""
    import textwrap

    found = re.findall(r"^( *)```(\w*)\n(.*?)^\1```$", DOC.read_text(), re.M | re.S)
    return [(lang, textwrap.dedent(indent + body)) for indent, lang, body in found]


def shell_commands(text: str) -> Iterator[list[str]]:
    """Each command of a shell block (continuation lines joined, comments dropped), as
    argv, split at `&`, `|`, `;`."""
    import shlex

    for line in text.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        for token in lexer:
            if set(token) <= set(";&|"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


#: snake_case names in the doc's inline code that are not cache config keys.
DOC_NON_KEYS = {"kv_connector_extra_config"}


def test_the_docs_blocks_and_names_are_what_lmcache_reads(monkeypatch, tmp_path, reads):
    """Every YAML block of docs/deployment.md is checked as what it says it is (chart
    values are rendered and validated), every `lmcache server` and --kv-transfer-config
    in it is parsed as lmcache parses them, and every config key it names is a key."""
    versions = kube_versions()
    checked: dict[str, int] = {}
    for lang, text in doc_blocks():
        if lang == "yaml":
            first = text.splitlines()[0]
            data = yaml.safe_load(text)
            if first == "# values for deploy/helm/lmcache":
                objs = render(data)
                assert not validate(objs, [versions[0], versions[-1]])
                assert not check_objects(objs, reads, "doc values")
            elif first == "# engine pod spec":
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "e"}, "spec": data}
                assert not validate([pod], [versions[0], versions[-1]])
                assert not check_objects([pod], reads, "doc engine pod")
                (c,) = data["containers"]
                check_engine_pod(monkeypatch, tmp_path, reads, c, data["volumes"], "doc")
            elif first == "# cache.yaml":
                assert not reads.cache_config(data, "doc cache.yaml")
            else:
                pytest.fail(f"a YAML block of the doc that no check reads: {first!r}")
            checked[first] = checked.get(first, 0) + 1
        elif lang == "bash":
            for argv in shell_commands(text):
                for i in range(len(argv) - 1):
                    if argv[i : i + 2] == ["lmcache", "server"]:
                        assert not reads.server_args(argv[i + 2 :], "doc")
                        checked["lmcache server"] = checked.get("lmcache server", 0) + 1
                if (tc := kv_transfer_arg(argv)) is not None:
                    assert not reads.kv_transfer(tc, "doc")
        else:
            assert lang == "", f"a {lang} block of the doc that no check reads"
    assert checked.get("# values for deploy/helm/lmcache") and checked.get("# engine pod spec")
    doc = DOC.read_text()
    # `lmcache server ...` in the prose, as written (possibly across a line break).
    spans = [" ".join(m.split()) for m in re.findall(r"`(lmcache server[^`]*)`", doc)]
    assert spans
    for span in spans:
        assert not reads.server_args(span.split()[2:], f"doc `{span}`")
    # --kv-transfer-config JSON and config keys in inline code.
    for js in re.findall(r"`('?\{\"kv_connector\"[^`]*\}'?)`", doc):
        assert not reads.kv_transfer(js.strip("'"), "doc")
    from lmcache_core.config_sources import SECRET_KEYS  # read, to be refused

    names = set(re.findall(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`", doc))
    tests_here = {n for n in names if n.startswith("test_") and callable(globals().get(n))}
    unknown = names - reads.keys - SECRET_KEYS - DOC_NON_KEYS - tests_here
    assert not unknown, f"named in the doc, not cache config keys: {sorted(unknown)}"
    assert {"max_local_cpu_size", "server_url", "local_disk"} <= names
