#!/usr/bin/env bash
# The test suite: set up the environment if needed, then run pytest (arguments are passed to pytest,
# e.g. `bash tools/test.sh -m "not slow"` for the fast suite only).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 tools/install.py
exec "${GMMSEG_VENV:-.venv}/bin/python" -m pytest "$@"
