#!/usr/bin/env bash
# Set up a small runtime environment in .venv-run (CPU torch, no reference libraries) and generate.
# Without a prompt (no arguments, or options only, as in `--seed 1`) it draws the default model's example.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/run_env.sh
setup_run_env .
if [ $# -eq 0 ] || { [[ $1 == -* ]] && [[ " $* " != *" --prompts"* ]]; }; then
  set -- "red apple, food-fruit, google style" "$@"
fi
.venv-run/bin/latentforge generate "$@"
