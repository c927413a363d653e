#!/usr/bin/env bash
# Accelerator numbers in one command (≤ 8 minutes on an H100-class GPU): per-example gradients
# of SmolLM2-135M and a random ~1.1B Llama against the batched-mean limit and the batch-size-1
# loop, the projection, and the walk at N = 270k, d = 8192 against its bandwidth floor, on the
# first device JAX finds (see scripts/bench_device.py). Uses the `python` on PATH: activate an
# environment with this package and the jax build for the accelerator (jax[cuda12], jax[tpu]).
#   bash scripts/bench_device.sh              # full sizes
#   bash scripts/bench_device.sh --reduced    # tiny sizes: a smoke run on CPU
# A run still going at 8 minutes is interrupted (SIGINT) and prints the table it has so far.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=30 "${G2IS_BENCH_LIMIT_S:-470}" \
  "${PYTHON:-python}" scripts/bench_device.py "$@"
