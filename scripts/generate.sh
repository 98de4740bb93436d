#!/usr/bin/env bash
# Set up a small runtime environment in .venv-run (CPU torch, no reference libraries) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/run_env.sh
setup_run_env .
[ $# -gt 0 ] || set -- "red apple, food-fruit, google style"
.venv-run/bin/latentforge generate "$@"
