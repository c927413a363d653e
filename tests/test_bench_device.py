"""scripts/bench_device.py in its reduced mode (tiny models, N = 2,000, d = 256) on CPU: a smoke
test that the accelerator benchmark runs end to end and prints a complete, consistent table. It
times nothing that is asserted: the numbers only have to be finite and positive."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _table(stdout: str) -> dict[str, tuple[float, str, float, str]]:
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or len(cells) != 5 or cells[0] == "measurement":
            continue
        what, value, unit, ratio, ratio_is = cells
        rows[what] = (float(value), unit, float(ratio), ratio_is)
    return rows


@pytest.mark.slow
def test_reduced_run_prints_every_row_with_finite_positive_numbers():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_device.py"),
                           "--reduced"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("device: cpu (cpu,"), proc.stdout[:200]
    rows = _table(proc.stdout)
    models = ["tiny-a random (for smollm2-135m)", "tiny-b random, GQA (for llama-1.1b)"]
    grads = ["batched mean gradient (the limit)", "per-example vmap(grad) (g2is grads)",
             "batch-size-1 loop of jitted grad (LESS pattern)"]
    want = [f"{m}: {g}" for m in models for g in grads]
    for m in models:
        want += [w for w in rows if w.startswith(f"{m}: projection ")]
        assert sorted(w.split(", P=")[0] for w in rows if w.startswith(f"{m}: projection ")) == [
            f"{m}: projection rademacher", f"{m}: projection sparse"]
    walks = [w for w in rows if w.startswith("walk N=2,000 d=256 ratio 0.01")]
    assert len(walks) == 4, walks
    for dtype in ("float32", "bfloat16"):
        label = f"walk N=2,000 d=256 ratio 0.01, T {dtype}: "
        selected = [w for w in walks if w.startswith(label) and w.endswith("rows selected")]
        floor = [w for w in walks if w.startswith(label + "bandwidth floor")]
        assert len(selected) == 1 and len(floor) == 1, walks
        k = int(selected[0][len(label):].split()[0])
        assert 0 < k <= 20  # int(2000 × 0.01); a component may end short
        seconds, floor_s = rows[selected[0]][0], rows[floor[0]][0]
        assert rows[selected[0]][2] == pytest.approx(seconds / floor_s, rel=2e-3)
    assert sorted(rows) == sorted(want + walks)
    for what, (value, unit, ratio, _) in rows.items():
        assert math.isfinite(value) and value > 0, what
        assert math.isfinite(ratio) and ratio > 0, what
        assert unit in ("records/s", "s"), what
    for m in models:  # the ratios are the table's own numbers divided
        mean, per_ex, loop = (rows[f"{m}: {g}"][0] for g in grads)
        assert rows[f"{m}: {grads[1]}"][2] == pytest.approx(per_ex / mean, rel=2e-3)
        assert rows[f"{m}: {grads[2]}"][2] == pytest.approx(per_ex / loop, rel=2e-3)
