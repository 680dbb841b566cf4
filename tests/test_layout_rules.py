"""Where things live (docs/architecture.md, docs/benchmarks.md), checked: nothing edits
sys.path; tools import each other only through packages; lmcache_core.testing holds suites
and fixtures, not the load tools; every benchmark driver in tools/ runs a package's bench
module; the dtype is picked from the CPU in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "build", "__pycache__", ".cache", "node_modules"}
CORE = ROOT / "packages" / "lmcache-core" / "src" / "lmcache_core"


def _python_files(*roots: Path) -> list[Path]:
    return [
        p for root in roots for p in root.rglob("*.py") if not SKIP & set(p.relative_to(ROOT).parts)
    ]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def _touches_sys_path(node: ast.AST) -> bool:
    """A call of ``sys.path``'s insert, append or extend; ``sys.path[...] = ``; ``sys.path = ``.

    (pytest's ``monkeypatch.syspath_prepend`` of a temporary folder, which makes a
    throwaway distribution importable as an installed plugin would be, is not an import
    of the repository's own code and stays allowed.)"""
    if isinstance(node, ast.Attribute):
        v = node.value
        is_sys_path = (
            isinstance(v, ast.Attribute)
            and v.attr == "path"
            and isinstance(v.value, ast.Name)
            and v.value.id == "sys"
        )
        return is_sys_path and node.attr in ("insert", "append", "extend")
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any("sys.path" in ast.unparse(t) for t in targets)
    return False


def test_nothing_edits_sys_path():
    files = _python_files(ROOT / "tests", ROOT / "packages", ROOT / "tools", ROOT / "src")
    bad = [
        f"{p.relative_to(ROOT)}:{node.lineno}"
        for p in files
        for node in ast.walk(ast.parse(p.read_text()))
        if _touches_sys_path(node)
    ]
    assert not bad, f"import through packages instead: {bad}"


def test_tools_import_no_other_tool():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    bad = [
        (p.name, m)
        for p in (ROOT / "tools").glob("*.py")
        for m in _imports(p)
        if m.split(".")[0] in tools
    ]
    assert not bad, f"a helper shared by tools belongs in a package module: {bad}"


def test_core_testing_holds_suites_not_load_tools():
    bad = [
        (p.relative_to(ROOT), m)
        for p in _python_files(CORE / "testing")
        for m in _imports(p)
        if m.startswith("lmcache_core.bench") or "httpx" in m
    ]
    assert not bad


def test_the_data_path_never_imports_the_bench_wing():
    outside = [
        p for p in _python_files(CORE) if "bench" not in p.relative_to(CORE).parts
    ]  # fmt: skip
    bad = [
        (p.relative_to(ROOT), m)
        for p in outside
        if p.name != "cli.py"  # lmcache bench ... imports it, lazily, per subcommand
        for m in _imports(p)
        if m.startswith("lmcache_core.bench")
    ]
    assert not bad
    assert not [p for p in CORE.glob("*.py") if re.match(r"(bench|loadgen|workload|load_)", p.name)]


def test_every_benchmark_driver_runs_a_package_bench_module():
    """docs/benchmarks.md: library code in a package's ``bench`` module, drivers in tools/."""
    bench = re.compile(r"^lmcache_\w+\.bench(\.|$)|^lmcache_core\.cli$")
    drivers = sorted((ROOT / "tools").glob("bench_*.py"))
    assert drivers
    bad = [p.name for p in drivers if not any(bench.match(m) for m in _imports(p))]
    assert not bad, f"these benchmarks keep their measurement in tools/: {bad}"


def test_the_dtype_is_picked_from_the_cpu_in_one_place():
    for p in (ROOT / "tools").glob("*.py"):
        text = p.read_text()
        assert "avx512_bf16" not in text and "amx_bf16" not in text, p.name
        assert "faster than bf16" not in text, f"{p.name}: a stale dtype help string"
        if re.search(r"""["']--dtype["']""", text):
            assert "tool_args" in text, f"{p.name} takes --dtype without the shared prelude"
