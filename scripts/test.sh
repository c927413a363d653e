#!/usr/bin/env bash
# The test command: sets up .venv from the project's own files, then runs the suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
G2IS_EXTRAS=test . "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
# Two workers (pytest-xdist): most tests are single-threaded compiles, so two processes keep both
# cores busy. G2IS_TEST_WORKERS=0 runs in one process (e.g. with -s or a debugger).
WORKERS="${G2IS_TEST_WORKERS:-2}"
if [ "$WORKERS" = 0 ]; then
  exec python -m pytest -q "$@"
fi
exec python -m pytest -q -n "$WORKERS" "$@"
