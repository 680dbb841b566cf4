"""Compiling the kernels: the C library with the system C compiler, the CUDA one with nvcc.

Used by the wheel's build hook (``hatch_build.py``), by the tests (CUDA is
compiled with warnings as errors so it cannot rot on machines without a GPU),
and at run time when a wheel was built without a compiler and one is present
now. Plain shared libraries, opened with cffi's ABI mode: nothing links
against libtorch or libpython, so neither a torch nor a Python upgrade can
break them. CUDA's runtime is linked statically; only the driver is needed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
LIB_DIR = Path(__file__).parent / "_lib"
CPU_LIB = "liblmcache_cpu.so"
CUDA_LIB = "liblmcache_cuda.so"

#: GPU architectures compiled in: Turing, Ampere, Ada (sm_89 runs sm_80 code),
#: Hopper; PTX of the newest for later GPUs.
CUDA_ARCHS = ("75", "80", "90")
#: Overrides :data:`CUDA_ARCHS` for a build (a release image lists its targets):
#: compute capabilities without the dot, separated by commas, semicolons or spaces
#: ("80;90;100"); the last also gets PTX.
ARCHS_ENV = "LMCACHE_CUDA_ARCHS"


def cuda_archs(environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """The architectures to compile: ``LMCACHE_CUDA_ARCHS`` when set, else the defaults."""
    raw = (os.environ if environ is None else environ).get(ARCHS_ENV, "").strip()
    if not raw:
        return CUDA_ARCHS
    archs = tuple(a for a in raw.replace(";", ",").replace(" ", ",").split(",") if a)
    bad = [a for a in archs if not (a.isdigit() and 2 <= len(a) <= 3)]
    if bad or not archs:
        raise BuildError(
            f"{ARCHS_ENV}={raw!r}: give compute capabilities without the dot, e.g. '80;90' "
            f"(not {', '.join(bad) or 'nothing'})"
        )
    return archs


C_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra"]


class BuildError(RuntimeError):
    pass


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")


#: The sources each library is built from (headers included).
SOURCES = {
    CPU_LIB: ("lmcache_kernels.h", "lmcache_check.h", "lmcache_cpu.c"),
    CUDA_LIB: ("lmcache_kernels.h", "lmcache_check.h", "lmcache_cuda.cu"),
}


def source_digest(lib: str) -> str:
    """sha256 of the sources ``lib`` is built from: a library built from others is stale."""
    h = hashlib.sha256()
    for name in SOURCES[lib]:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return h.hexdigest()


def stamp_path(lib_path: Path) -> Path:
    return lib_path.with_name(lib_path.name + ".sha256")


def _stamp(out: Path, lib: str) -> None:
    stamp_path(out).write_text(source_digest(lib) + "\n")


def is_stale(lib_path: Path, lib: str) -> bool:
    """True when ``lib_path`` was built from sources other than the ones shipped now."""
    try:
        return stamp_path(lib_path).read_text().strip() != source_digest(lib)
    except OSError:
        return True  # no stamp: built by an older version


def c_compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def nvcc() -> str | None:
    for cand in (
        os.environ.get("LMCACHE_NVCC"),
        shutil.which("nvcc"),
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def build_cpu(out_dir: Path | None = None, *, werror: bool = False) -> Path:
    out_dir = LIB_DIR if out_dir is None else out_dir
    cc = c_compiler()
    if cc is None:
        raise BuildError("no C compiler (cc, gcc or clang) found; set CC")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / CPU_LIB
    tmp = out_dir / f".{CPU_LIB}.{os.getpid()}"
    flags = [*C_FLAGS, *(["-Werror"] if werror else [])]
    _run([cc, *flags, str(CSRC / "lmcache_cpu.c"), "-o", str(tmp)])
    os.replace(tmp, out)  # atomic: a process loading the library never sees half of it
    _stamp(out, CPU_LIB)
    return out


def build_cuda(
    out_dir: Path | None = None, *, werror: bool = False, archs: tuple[str, ...] | None = None
) -> Path:
    out_dir = LIB_DIR if out_dir is None else out_dir
    archs = cuda_archs() if archs is None else archs
    compiler = nvcc()
    if compiler is None:
        raise BuildError("nvcc not found; set LMCACHE_NVCC or CUDA_HOME")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / CUDA_LIB
    tmp = out_dir / f".{CUDA_LIB}.{os.getpid()}"
    cmd = [compiler, "-O3", "-shared", "-Xcompiler", "-fPIC,-Wall" + (",-Werror" if werror else "")]
    if werror:
        cmd += ["-Werror", "all-warnings"]
    for a in archs[:-1]:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    last = archs[-1]
    cmd += ["-gencode", f"arch=compute_{last},code=[sm_{last},compute_{last}]"]
    _run([*cmd, str(CSRC / "lmcache_cuda.cu"), "-o", str(tmp)])
    os.replace(tmp, out)
    _stamp(out, CUDA_LIB)
    return out
