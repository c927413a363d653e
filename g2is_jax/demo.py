"""The demo on the embedded default: SmolLM2-135M-Instruct and the synthetic task suite.

`g2is demo` is `g2is run` with `demo_config()`: it writes the suite (a mixed pool with
conflicting records and distractors, one target domain with a small validation split and a test
split), trains a warmup LoRA on a sample of the pool, computes Adam gradient features of the
pool and SGD features of the target's validation examples, selects with g2is, less and random at
one budget, fine-tunes a LoRA on each selection, evaluates every fine-tune (and the base model)
on the target's test split, and writes the report with its plots. Every stage is cached in the
run directory; a re-run after a crash continues where it stopped.

The sizes are picked to finish within 15 minutes on 2 CPU cores without a GPU (measured: see
the README; a pool of 600 with 50 test records took 16 min 8 s, so the pool is 500):

- pool 500 records (10% target domain, a fifth of those conflicting; 30% distractors): features
  of the pool cost about 0.6 s per record on 2 cores, compilation included, and dominate the run;
- every record carries the short system message "Answer briefly.", which replaces SmolLM2's
  ~20-token default system prompt: records average ~42 tokens, so nearly all fall in the 64-token
  length bucket (max_length 128 keeps the few longer ones whole);
- LoRA rank 8 (alpha 32) on q, k, v, o for warmup and fine-tune (P = 921,600 parameters);
- the sparse block JL projection to d = 8192 (the dense one would cost more than the
  gradients at this P);
- warmup: 10% of the pool, one epoch, no gradient accumulation, so that warmup and fine-tunes
  share one optimizer and one compiled training step per length bucket (7 optimizer steps: too
  few for gradient conflicts, and the report's diagnostics say so; the long evaluation,
  `scripts/experiment_gsm8k_bbh.py`, warms up for 100); fine-tune: 3 epochs on a 5% selection
  (25 records; the authors' 1%, `g2is run`'s default, would be 5 records of this pool);
- evaluation: 40 test records, loss and greedy exact match (8 new tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from g2is_jax.runconfig import (
    EvalConfig,
    FeaturesConfig,
    RunConfig,
    SelectConfig,
    SuiteConfig,
    TrainSection,
)

DEMO_SYSTEM = "Answer briefly."


def demo_config(*, model: str = "smollm2-135m", target: str = "arithmetic", n_pool: int = 500,
                ratio: float = 0.05, dim: int = 8192, seed: int = 0) -> RunConfig:
    """The demo's run config (see the module docstring for why these sizes)."""
    return RunConfig(
        model=model,
        max_length=128,
        suite=SuiteConfig(n_pool=n_pool, target=target, target_share=0.1, n_dev=16, n_test=40,
                          system=DEMO_SYSTEM, seed=seed),
        warmup=TrainSection(preset="cpu", fraction=0.1, epochs=1, grad_accum=1, lora_rank=8,
                            seed=seed),
        features=FeaturesConfig(projection="sparse", dim=dim, seed=seed, batch_size=8),
        select=SelectConfig(methods=("g2is", "less", "random"), ratios=(ratio,), seeds=(seed,)),
        finetune=TrainSection(preset="cpu-finetune", lora_rank=8),
        evaluate=EvalConfig(generate=True, max_new_tokens=8, batch_size=10),
    )


def run_demo(out: str | Path, cfg: RunConfig | None = None, *, progress: bool = True
             ) -> dict[str, Any]:
    """Run (or resume) the demo in `out`; returns the report (also in out/report.*)."""
    from g2is_jax.pipeline import run_pipeline

    return run_pipeline(cfg if cfg is not None else demo_config(), out, progress=progress)


__all__ = ["DEMO_SYSTEM", "demo_config", "run_demo"]
