#!/usr/bin/env bash
# Set up a small runtime environment in .venv-run (CPU torch, no reference libraries) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-run/bin/python ] || "$PYTHON" -m venv .venv-run
.venv-run/bin/pip install -q "torch==2.13.0" 2>/dev/null || .venv-run/bin/pip install -q "torch>=2.4"
.venv-run/bin/pip install -q .
[ $# -gt 0 ] || set -- "red apple, google style"
.venv-run/bin/latentforge generate "$@"
