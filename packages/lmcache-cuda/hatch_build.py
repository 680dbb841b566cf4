"""Wheel build hook: compile the C (and, where nvcc is present, the CUDA) kernels.

A missing compiler never fails the build: the wheel then carries no library,
and ``lmcache_cuda`` warns at import and falls back to the torch reference.
``LMCACHE_BUILD_CUDA=0`` skips CUDA (it is built whenever nvcc is found).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _build_module():
    path = Path(__file__).parent / "src" / "lmcache_cuda" / "build.py"
    spec = importlib.util.spec_from_file_location("_lmcache_cuda_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class KernelBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        build = _build_module()
        built = []
        try:
            built.append(build.build_cpu())
        except build.BuildError as e:
            print(f"lmcache-cuda: C kernels not built ({e}); the torch reference will be used",
                  file=sys.stderr)  # fmt: skip
        if os.environ.get("LMCACHE_BUILD_CUDA", "1") != "0" and build.nvcc():
            try:
                built.append(build.build_cuda())
            except build.BuildError as e:
                print(f"lmcache-cuda: CUDA kernels not built ({e})", file=sys.stderr)
        if built:
            build_data["pure_python"] = False
            # Plain shared libraries opened with cffi's ABI mode: they depend on the
            # platform, never on the Python version or ABI, so one wheel serves every
            # CPython (vLLM's images run another Python than a build host may).
            platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")
            build_data["tag"] = f"py3-none-{platform}"
            # Each library with its source stamp, so an installed one is not rebuilt.
            paths = [q for p in built for q in (p, build.stamp_path(p))]
            build_data["artifacts"].extend(str(p.relative_to(Path(self.root))) for p in paths)
