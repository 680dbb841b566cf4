#!/usr/bin/env bash
# Build the release wheels: one per package, and the `lmcache` meta-package.
#
#     tools/build_wheels.sh            # into dist/
#     tools/build_wheels.sh OUT_DIR
#
# Each package is built from its folder with the build isolation a release
# uses (hatchling from PyPI). lmcache-cuda compiles its C kernels, and its CUDA
# kernels wherever nvcc is found (a GPU is not needed to compile;
# LMCACHE_BUILD_CUDA=0 skips them, LMCACHE_CUDA_ARCHS="80;90" picks the architectures).
#
# The meta-package's extras are local folder references in a checkout (so no
# resolver can pick PyPI's unrelated `lmcache-vllm`); in its wheel they become
# exact pins on the sibling wheels built here (`lmcache-vllm==0.1.0`). Install
# them from this folder only, never from an index by name:
#
#     pip install --no-index --find-links dist 'lmcache[vllm]'
#
# (install third-party requirements first, or drop --no-index and keep
# --find-links: then pip could still pick PyPI's `lmcache` of the same version.)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-dist}" && cd "${1:-dist}" && pwd)
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PIP=("$PYTHON" -m pip --disable-pip-version-check -q)

rm -f "$OUT"/lmcache*.whl
for pkg in lmcache-core lmcache-cuda lmcache-vllm lmcache-sglang lmcache-nixl lmcache-server; do
    echo "build_wheels: $pkg"
    "${PIP[@]}" wheel --no-deps -w "$OUT" "packages/$pkg"
done

# The meta-package, from a copy whose folder references are pins on the wheels above.
STAGE=$(mktemp -d)
trap 'rm -rf "$STAGE"' EXIT
cp -r pyproject.toml README.md lmcache_meta_version.py src "$STAGE/"
"$PYTHON" - "$STAGE/pyproject.toml" "$OUT" <<'PY'
import re
import sys
from pathlib import Path

pyproject, out = Path(sys.argv[1]), Path(sys.argv[2])
versions = {}
for wheel in out.glob("lmcache_*.whl"):
    name, version = wheel.name.split("-")[:2]
    versions[name.replace("_", "-")] = version


def pin(m: re.Match) -> str:
    name, extras = m.group(1), m.group(2) or ""
    if name not in versions:
        sys.exit(f"build_wheels: no wheel of {name} was built")
    return f'"{name}{extras}=={versions[name]}"'


text = re.sub(r'"(lmcache-[a-z]+)(\[[a-z0-9,]+\])? @ \{root:uri\}/packages/lmcache-[a-z]+"',
              pin, pyproject.read_text())
if any("{root:uri}" in ln for ln in text.splitlines() if not ln.lstrip().startswith("#")):
    sys.exit("build_wheels: a folder reference is left in the meta-package")
text = text.replace("allow-direct-references = true", "allow-direct-references = false")
pyproject.write_text(text)
PY
echo "build_wheels: lmcache (meta-package)"
"${PIP[@]}" wheel --no-deps -w "$OUT" "$STAGE"
ls -1 "$OUT"/lmcache*.whl
