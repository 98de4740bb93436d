#!/usr/bin/env bash
# Set up the runtime environment (.venv-run, CPU torch) with the server extra and serve A1111's API.
#   bash scripts/serve.sh [--port 7860] [--models-dir DIR] [--token USER:PASS] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-run/bin/python ] || "$PYTHON" -m venv .venv-run
pip_install() { .venv-run/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip_install "torch==2.13.0" 2>/dev/null || pip_install "torch>=2.4"
pip_install ".[server]"
exec .venv-run/bin/latentforge serve "$@"
