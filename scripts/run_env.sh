# Sourced by generate.sh and serve.sh: set up .venv-run (CPU torch, no reference libraries) with the
# package spec given ("." or ".[server]").
setup_run_env() {
  local python=${PYTHON:-python3}
  [ -x .venv-run/bin/python ] || "$python" -m venv .venv-run
  # pip warns once per package about this machine's local index folders; those lines are noise.
  pip_install() { .venv-run/bin/pip install -q "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
  pip_install "torch==2.13.0" 2>/dev/null || pip_install "torch>=2.4"
  pip_install "$1"
}
