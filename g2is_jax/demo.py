"""The demo on the embedded default: SmolLM2-135M-Instruct and the synthetic task suite.

Steps, each cached in the run directory and skipped when its output exists (a re-run after a
crash continues where it stopped): write the suite (a mixed pool with conflicting records and
distractors, one target domain with a small validation split) → warmup LoRA training on a
fraction of the pool → Adam gradient features of the pool and SGD features of the target's
validation examples at the warmup checkpoint → selection by g2is, less and random at one budget
→ a report of what each method picked, scored against the generator's labels (the share of the
selection that is clean target-domain data, and how many conflicting records slipped in).

Sizes are picked to finish within about 15 minutes on 2 CPU cores: see `DemoConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from g2is_jax.data import load_records, suite
from g2is_jax.errors import G2ISError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m"
    target: str = "arithmetic"
    n_pool: int = 600
    target_share: float = 0.1  # 60 target-domain records in the pool, 20% of them conflicting
    n_dev: int = 16
    n_test: int = 50
    warmup_fraction: float = 0.1
    warmup_epochs: int = 1
    max_length: int = 128  # the suite's records are 40-90 SmolLM2 tokens
    lora_rank: int = 8
    projection: str = "sparse"
    dim: int = 8192
    batch_size: int = 8
    ratio: float = 0.05
    methods: tuple[str, ...] = ("g2is", "less", "random")
    seed: int = 0


def _step(name: str, done: bool) -> float:
    print(f"[demo] {name}{' (cached)' if done else ''}", flush=True)
    return time.perf_counter()


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig()) -> dict[str, Any]:
    """Run (or resume) the demo in `out`; returns the report (also written to out/report.*)."""
    from g2is_jax.featurize import compute_features
    from g2is_jax.models.config import LoraConfig
    from g2is_jax.models.loading import load_model
    from g2is_jax.projection import Projector
    from g2is_jax.select import g2is_select, less_select, random_select
    from g2is_jax.store import load_features
    from g2is_jax.train import TRAIN_PRESETS, load_checkpoint, train_lora

    out = Path(out)
    t_start = time.perf_counter()
    data = out / "data"
    _step("write the synthetic suite", (data / "suite.json").exists())
    if not (data / "suite.json").exists():
        suite(data, n_pool=cfg.n_pool, n_dev=cfg.n_dev, n_test=cfg.n_test, seed=cfg.seed,
              target=cfg.target, target_share=cfg.target_share)
    pool = load_records(data / "pool.jsonl")
    dev = load_records(data / f"{cfg.target}.dev.jsonl")
    base_model, tok = load_model(cfg.model)

    warm = out / "warmup"
    train_cfg = dataclasses.replace(
        TRAIN_PRESETS["cpu"], fraction=cfg.warmup_fraction, epochs=cfg.warmup_epochs,
        max_length=cfg.max_length, seed=cfg.seed,
        lora=LoraConfig(rank=cfg.lora_rank, alpha=4.0 * cfg.lora_rank, dropout=0.1))
    ckpt = warm / "checkpoints" / str(cfg.warmup_epochs)
    _step("warmup LoRA training", ckpt.exists())
    if not ckpt.exists():
        train_lora(base_model, tok, pool, warm, train_cfg,
                   run_info={"model": cfg.model, "data": "pool.jsonl"})
    model, moments, ck_meta = load_checkpoint(base_model, ckpt)

    projector = Projector(kind=cfg.projection, dim=cfg.dim, seed=cfg.seed)
    feats = {}
    for role, records, kind in (("pool", pool, "adam"), ("dev", dev, "sgd")):
        path = out / "features" / role
        _step(f"{kind} gradient features of the {role} ({len(records)} records)",
              (path / "features.npy").exists())
        if not (path / "features.npy").exists():
            compute_features(model, tok, records, path, gradient=kind, projector=projector,
                             moments=moments if kind == "adam" else None,
                             batch_size=cfg.batch_size, max_length=cfg.max_length,
                             meta={"model": cfg.model, "checkpoint": str(ckpt),
                                   "checkpoint_lr": ck_meta["epoch_mean_lr"]})
        feats[role] = load_features(path)[0]

    t_sel = _step(f"select {', '.join(cfg.methods)} at ratio {cfg.ratio}", False)
    T, V = feats["pool"], feats["dev"]
    selections: dict[str, list[int]] = {}
    for method in cfg.methods:
        if method == "g2is":
            res = g2is_select(T, V, ratio=cfg.ratio)
        elif method == "less":
            res = less_select([T], [V], ratio=cfg.ratio)
        elif method == "random":
            res = random_select(len(T), ratio=cfg.ratio, seed=cfg.seed)
        else:
            raise G2ISError(f"the demo knows methods g2is, less, random; got {method!r}")
        selections[method] = [int(i) for i in np.asarray(res.indices)]
    select_s = time.perf_counter() - t_sel

    report = {
        "config": {**dataclasses.asdict(cfg), "methods": list(cfg.methods)},
        "pool": dict(Counter(f"{r.meta['domain']}/{r.meta['kind']}" for r in pool)),
        "methods": {m: _score(pool, idx, cfg.target) for m, idx in selections.items()},
        "selections": selections,
        "seconds": {"select": round(select_s, 2),
                    "total": round(time.perf_counter() - t_start, 1)},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(format_report(report))
    return report


def _score(pool, idx: list[int], target: str) -> dict[str, Any]:
    chosen = [pool[i].meta for i in idx]
    n = max(len(chosen), 1)
    clean = sum(m["domain"] == target and m["kind"] == "clean" for m in chosen)
    conflict = sum(m["domain"] == target and m["kind"] == "conflict" for m in chosen)
    return {"n": len(chosen), "target_clean": clean, "target_conflict": conflict,
            "precision": clean / n,
            "target_any": sum(m["domain"] == target for m in chosen),
            "distractors": sum(m["kind"] == "distractor" for m in chosen)}


def format_report(report: dict[str, Any]) -> str:
    cfg = report["config"]
    n_target = sum(v for k, v in report["pool"].items() if k.startswith(cfg["target"] + "/"))
    lines = [
        f"# g2is demo: target `{cfg['target']}`, pool {cfg['n_pool']} records "
        f"({n_target} of the target domain), ratio {cfg['ratio']}",
        "",
        "| method | selected | clean target (precision) | conflicting target | distractors |",
        "|---|---:|---:|---:|---:|",
    ]
    for m, s in report["methods"].items():
        lines.append(f"| {m} | {s['n']} | {s['target_clean']} ({s['precision']:.2f}) | "
                     f"{s['target_conflict']} | {s['distractors']} |")
    lines += ["", f"model {cfg['model']}, LoRA r={cfg['lora_rank']}, projection "
              f"{cfg['projection']} d={cfg['dim']}; total {report['seconds']['total']} s"]
    return "\n".join(lines) + "\n"
