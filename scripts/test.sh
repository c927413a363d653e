#!/usr/bin/env bash
# The test command: sets up .venv from the project's own files, then runs the suite on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
G2IS_EXTRAS=test . "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export JAX_PLATFORMS=cpu
exec python -m pytest -q "$@"
