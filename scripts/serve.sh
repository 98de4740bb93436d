#!/usr/bin/env bash
# Set up the runtime environment (.venv-run, CPU torch) with the server extra and serve A1111's API.
#   bash scripts/serve.sh [--port 7860] [--models-dir DIR] [--token USER:PASS] ...
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/run_env.sh
setup_run_env ".[server]"
exec .venv-run/bin/latentforge serve "$@"
