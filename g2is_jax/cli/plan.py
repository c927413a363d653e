"""`g2is plan`: per-device memory of `g2is grads` and of a training step, before launch."""

from __future__ import annotations

import argparse
import json
import math

from g2is_jax.errors import G2ISError


def register(sub: argparse._SubParsersAction) -> None:
    from g2is_jax.memory import DEVICES

    p = sub.add_parser(
        "plan",
        help="per-device memory of the features program and a training step, and whether it "
        "fits a device (no weights read)",
        description="Plans one device's memory for `g2is grads` (the per-example gradient "
        "features program) and for a LoRA training step on --mesh: base weights, adapters and "
        "optimizer state exactly from the abstract shapes and their shardings; activations and "
        "temporaries as an estimate per component and, unless --no-compile, as XLA reports "
        "them for the compiled programs (ahead-of-time, on abstract shapes; on simulated CPU "
        "devices when the present ones are too few). Reads only the model's config: a "
        "config.json, a checkpoint directory, a .gguf file or a named model. With --device "
        "or --device-memory it says whether each program fits.",
    )
    p.add_argument("--model", required=True, help="a config.json (any *.json of transformers' "
                   "config format), a checkpoint directory, a .gguf file or smollm2-135m")
    p.add_argument("--mesh", default="data=1", metavar="SPEC",
                   help="device mesh, e.g. data=4,fsdp=4 (default data=1: one device)")
    p.add_argument("--devices", type=int, metavar="N",
                   help="device count, for a mesh with a -1 axis (default: the axes' product)")
    p.add_argument("--batch-size", type=int, required=True,
                   help="rows per batch over the whole mesh (padded to a multiple of it)")
    p.add_argument("--max-length", type=int, required=True, help="tokens per row")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="the base weights and compute (default bfloat16)")
    p.add_argument("--lora-rank", type=int, default=128, help="LoRA rank (default 128, LESS)")
    p.add_argument("--lora-targets", default="q,k,v,o", help="comma list of q,k,v,o,gate,up,down")
    p.add_argument("--gradient", choices=["adam", "sgd", "sign"], default="adam",
                   help="feature type (adam carries the checkpoint's moments)")
    p.add_argument("--dim", type=int, default=8192, help="projected dimension")
    dev = p.add_mutually_exclusive_group()
    dev.add_argument("--device", choices=list(DEVICES),
                     help="; ".join(f"{k}: {v[0]}" for k, v in DEVICES.items()))
    dev.add_argument("--device-memory", type=float, metavar="GB",
                     help="usable memory per device in GiB (instead of --device)")
    p.add_argument("--no-compile", action="store_true",
                   help="shapes and estimates only (no XLA compile of the programs)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _cpu_devices(n: int) -> None:
    """Ask for `n` simulated CPU devices to compile for, if JAX has not started yet."""
    import jax

    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already up (a notebook, a test): use what exists
        pass


def run(args: argparse.Namespace) -> int:
    from g2is_jax import sharding
    from g2is_jax.memory import memory_plan, usable_memory
    from g2is_jax.models.loading import load_config

    spec = sharding.parse_mesh(args.mesh)
    if args.devices is not None and args.devices < 1:
        raise G2ISError(f"--devices must be ≥ 1, got {args.devices}")
    if args.lora_rank < 1:
        raise G2ISError(f"--lora-rank must be ≥ 1, got {args.lora_rank}")
    usable_memory(args.device, args.device_memory)  # a bad --device-memory fails first
    fixed = math.prod(s for s in (spec.data, spec.fsdp) if s != -1)
    data, fsdp = spec.resolve(args.devices if args.devices is not None else fixed)
    if not args.no_compile:
        _cpu_devices(data * fsdp)
    cfg = load_config(args.model)
    plan = memory_plan(cfg, sharding.MeshSpec(data, fsdp), batch_size=args.batch_size,
                       max_length=args.max_length, dtype=args.dtype, lora_rank=args.lora_rank,
                       lora_targets=args.lora_targets, gradient=args.gradient, dim=args.dim,
                       compile=not args.no_compile, model_name=str(args.model))
    if args.json:
        doc = plan.to_json()
        target = usable_memory(args.device, args.device_memory)
        if target is not None:
            doc["device"] = {"label": target[0], "usable_bytes": target[1],
                             "fits": plan.fits(target[1])}
        print(json.dumps(doc, indent=1))
    else:
        print(plan.describe(args.device, args.device_memory))
    return 0
