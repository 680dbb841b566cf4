#!/usr/bin/env bash
# Set up (if needed) and run every test and the linter. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
.venv/bin/ruff check packages tests tools src
.venv/bin/python -m pytest "$@"
