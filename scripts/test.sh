#!/usr/bin/env bash
# Set up a test environment in .venv (reference oracles included) and run the default test suite.
# torch/torchvision: the pair that lies on this project's machines (x86_64: CUDA build that runs on CPU),
# needed because several references (open_clip, torch-fidelity, pytorch-fid) import torchvision.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
case "$(uname -m)" in
  aarch64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
# pip warns once per package about this machine's local index folders; those lines are noise.
pip_install() { .venv/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# tests/browser drive Debian's chromium through Playwright; Playwright must never fetch a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      chromium chromium-driver; } >/dev/null 2>&1 || echo "note: chromium could not be installed: tests/browser will skip" >&2
fi
pip_install $TORCH
pip_install -e ".[test]"
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src/latentforge
# The openvino tests run in a process of their own (pyproject's `openvino` marker says why).
.venv/bin/python -m pytest -n 2 -q -m "not slow and not openvino" "$@"
.venv/bin/python -m pytest -n 2 -q -m "openvino and not slow" "$@"
