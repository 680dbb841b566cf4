"""The GPU smoke run's steps (called by tools/gpu_smoke.sh, which sets PYTHONPATH).

Each step is timed and recorded, a failed step does not stop the next ones, and
everything lands in OUT_DIR/gpu_smoke.json, written after every step so a run
cut short still leaves what it measured. Exit status: 0 when every step passed.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "gpu-smoke-out")
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "steps": {}}

    def save() -> None:
        (out_dir / "gpu_smoke.json").write_text(json.dumps(report, indent=2, default=str))

    def step(name: str, fn, budget_s: float | None = None) -> object:
        t0 = time.perf_counter()
        print(f"gpu_smoke: {name} ...", flush=True)
        try:
            result = fn()
            ok = not (isinstance(result, dict) and result.get("ok") is False)
            report["steps"][name] = {
                "ok": ok,
                "s": round(time.perf_counter() - t0, 1),
                "result": result,
            }
        except Exception as e:  # recorded; the next step still runs
            report["steps"][name] = {
                "ok": False,
                "s": round(time.perf_counter() - t0, 1),
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:],
            }
            result = None
        print(f"gpu_smoke: {name}: {'ok' if report['steps'][name]['ok'] else 'FAILED'} "
              f"({report['steps'][name]['s']} s)", flush=True)  # fmt: skip
        save()
        return result

    import torch

    def machine() -> dict:
        nvcc = shutil.which("nvcc")
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True,
        )  # fmt: skip
        return {
            "gpu": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "nvidia_smi": smi.stdout.strip(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "python": platform.python_version(),
            "nvcc": subprocess.run([nvcc, "--version"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
            if nvcc
            else None,
        }

    report["machine"] = step("machine", machine)
    if not torch.cuda.is_available():
        save()
        print("gpu_smoke: torch sees no CUDA device", file=sys.stderr)
        return 1

    def build_kernels() -> dict:
        from lmcache_cuda import _ffi, build

        major, minor = torch.cuda.get_device_capability(0)
        c = build.build_cpu(werror=True)
        cu = build.build_cuda(werror=True, archs=(f"{major}{minor}",))
        _ffi.cpu_lib.cache_clear()
        _ffi.cuda_lib.cache_clear()
        lib = _ffi.cuda_lib()
        return {
            "c": str(c),
            "cuda": str(cu),
            "abi": lib.lmc_abi_version(),
            "devices": lib.lmc_cuda_device_count(),
            "ok": lib.lmc_cuda_device_count() > 0,
        }

    step("build (warnings as errors)", build_kernels)

    def pytest(*args: str) -> dict:
        junit = out_dir / f"junit-{len(report['steps'])}.xml"
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--junitxml={junit}", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=150,
        )  # fmt: skip
        tail = (r.stdout + r.stderr)[-4000:]
        print(tail, flush=True)
        return {
            "ok": r.returncode == 0,
            "rc": r.returncode,
            "summary": tail.strip().splitlines()[-1:],
        }

    cuda_tests = ROOT / "packages/lmcache-cuda/tests"
    step("gpu-marked tests", lambda: pytest("-m", "gpu", str(cuda_tests / "test_build_and_gpu.py")))
    step(
        "kernel property tests (host side and CPU twins too)",
        lambda: pytest(
            str(cuda_tests / "test_cuda_kernel_properties.py"),
            str(cuda_tests / "test_strided_layouts.py"),
            str(cuda_tests / "test_cuda_async_saves.py"),
            str(cuda_tests / "test_layerwise_units.py"),
        ),
    )

    step(
        "MP mode: GPU KV into and out of an lmcache server's pinned arena",
        lambda: pytest(str(cuda_tests / "test_server_arena.py")),
    )

    def bandwidth() -> dict:
        from lmcache_cuda.bench import (
            LLAMA3_8B_FLASH,
            LLAMA3_8B_TP8,
            LLAMA3_8B_VLLM,
            bench_cuda,
        )

        wide = bench_cuda(LLAMA3_8B_FLASH)
        narrow = bench_cuda(LLAMA3_8B_TP8)
        # vLLM 0.32's own views (default order): rows of 8 runs of 256 bytes.
        vllm_views = bench_cuda(LLAMA3_8B_VLLM)
        return {
            "rows_2KiB": wide,
            "rows_256B": narrow,
            "vllm_bhnc_LBNHC": vllm_views,
            "targets": {"rows_2KiB": 0.9, "rows_256B": 0.8},
            "met": {
                "rows_2KiB": min(wide["gather_vs_memcpy_d2h"], wide["scatter_vs_memcpy_h2d"])
                >= 0.9,
                "rows_256B": min(narrow["gather_vs_memcpy_d2h"], narrow["scatter_vs_memcpy_h2d"])
                >= 0.8,
            },
        }

    step("bandwidth vs cudaMemcpyAsync", bandwidth)

    def layerwise() -> dict:
        from lmcache_cuda.bench import bench_layerwise

        r = bench_layerwise()
        r["target"] = 1.2
        # The connector's own scheme (events per layer); the host-thread loader beside it.
        r["met"] = r["evented_vs_longer"] <= 1.2
        r["ok"] = bool(r["correct"])
        return r

    step("layer-wise load overlapped with a synthetic forward", layerwise)

    def save_overhead() -> dict:
        from lmcache_cuda.bench import bench_save_overhead

        r = bench_save_overhead()
        r["target"] = 1.02
        r["met"] = r["async_vs_none"] <= 1.02
        r["ok"] = r["stored_tokens"] > 0
        return r

    step("saving in a decode-step loop (async and sync saves)", save_overhead)
    report["not_yet_built"] = [
        "vLLM end to end on the GPU (this machine has no vLLM)",
    ]
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
    failed = [k for k, v in report["steps"].items() if not v["ok"]]
    print(f"gpu_smoke: {len(report['steps']) - len(failed)}/{len(report['steps'])} steps ok"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
