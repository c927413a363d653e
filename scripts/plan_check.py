"""`g2is plan`'s estimated temporaries against XLA's compiled figures, on several models.

Run: ``python scripts/plan_check.py [--skip-8b]`` (float32, where XLA:CPU compiles what an
accelerator would; 16 simulated CPU devices; about 2 minutes on 2 cores). For each model, mesh
and batch it prints the estimate divided by `memory_analysis().temp_size_in_bytes` of the
compiled features program and training step.
"""

from __future__ import annotations

import argparse

import jax

CASES = [  # model, mesh, rows, tokens, LoRA rank
    ("tiny", "data=1", 8, 64, 8),
    ("tiny", "data=4", 8, 64, 8),
    ("tiny", "data=2,fsdp=2", 8, 128, 8),
    ("smollm2-135m", "data=4", 8, 128, 8),
    ("smollm2-135m", "data=2,fsdp=2", 8, 256, 128),
    ("examples/llama-3.1-8b/config.json", "data=4,fsdp=4", 16, 512, 128),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-8b", action="store_true")
    args = ap.parse_args()
    jax.config.update("jax_num_cpu_devices", 16)

    from g2is_jax.memory import memory_plan
    from g2is_jax.models.loading import load_config
    from g2is_jax.testing import tiny_model_config

    print("| model | mesh | rows x tokens | r | features: estimate / compiled | train step: "
          "estimate / compiled |")
    print("|---|---|---|---:|---:|---:|")
    for model, mesh, rows, tokens, rank in CASES:
        if args.skip_8b and "8b" in model:
            continue
        cfg = tiny_model_config() if model == "tiny" else load_config(model)
        n = 1
        for part in mesh.split(","):
            n *= int(part.split("=")[1])
        plan = memory_plan(cfg, mesh, batch_size=rows, max_length=tokens, dtype="float32",
                           lora_rank=rank, devices=jax.devices("cpu")[:n])
        ratios = [p.temporaries.bytes / p.compiled["temp"] for p in plan.programs]
        print(f"| {model} | {mesh} | {rows} x {tokens} | {rank} | {ratios[0]:.2f} | "
              f"{ratios[1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
