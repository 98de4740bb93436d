#!/usr/bin/env bash
# Set up a small runtime environment in .venv-run (CPU torch, no reference libraries) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-run/bin/python ] || "$PYTHON" -m venv .venv-run
pip_install() { .venv-run/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install "torch==2.13.0" 2>/dev/null || pip_install "torch>=2.4"
pip_install .
[ $# -gt 0 ] || set -- "red apple, google style"
.venv-run/bin/latentforge generate "$@"
