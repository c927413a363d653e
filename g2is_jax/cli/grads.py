"""`g2is grads`: per-example LoRA gradient features of a dataset into a feature store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from g2is_jax.cli import _scale
from g2is_jax.errors import G2ISError


def register(sub: argparse._SubParsersAction) -> None:
    from g2is_jax.projection import DEFAULT_DIM, KINDS

    p = sub.add_parser(
        "grads",
        help="per-example LoRA gradient features (vmap of grad + random projection)",
        description="Computes the gradient of every record's completion loss with respect to "
        "the LoRA params (jax.vmap of jax.grad over padded batches, one compiled program per "
        "length bucket), applies the feature transform (sgd: raw, for target validation data; "
        "adam: m'/sqrt(v'+eps) with the checkpoint's moments, for the pool; sign), projects it "
        "to --dim dimensions inside the same program and writes OUT/features.npy (row i = "
        "record i) and OUT/meta.json. Killed and re-run with the same command, it resumes; a "
        "changed input or setting is refused. Batches are split over every device of the "
        "--mesh; with several processes each writes its rows to OUT/shards/ and process 0 "
        "merges them (--gather) into the same OUT/features.npy one process writes.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="smollm2-135m (default), a .gguf file, or a Hugging Face checkpoint dir")
    p.add_argument("--data", required=True, help="JSON/JSONL/Parquet instruction records")
    p.add_argument("--out", required=True, help="feature-store directory")
    p.add_argument("--gradient", choices=["sgd", "adam", "sign", "representation"],
                   default="sgd", help="feature type; 'representation' stores the final hidden "
                   "state at the last token (LESS's RDS baseline; no adapter needed)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a warmup checkpoint RUN/checkpoints/<epoch> "
                     "(adapters + Adam moments + learning rate)")
    src.add_argument("--adapter", help="a PEFT LoRA adapter directory (sgd/sign only)")
    p.add_argument("--projection", choices=list(KINDS), default="rademacher")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM, help="projected dimension")
    p.add_argument("--seed", type=int, default=0, help="projection seed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the model's weights and compute (bfloat16: float32 softmax, loss, "
                   "LoRA factors, gradients and projection)")
    p.add_argument("--feature-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the stored features (bfloat16: half the disk and walk bandwidth)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing (finished or partial) store in --out")
    _scale.add_arguments(p, fsdp=True)
    p.add_argument("--gather", choices=["shared-fs", "network"], default="shared-fs",
                   help="with several processes, how their rows reach process 0: 'shared-fs' "
                   "(default): --out is one folder all processes write to, and process 0 merges "
                   "the shard folders; 'network': no shared folder, each process sends its rows "
                   "over the jax.distributed runtime in bounded steps (64 MiB by default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from g2is_jax.data import load_records
    from g2is_jax.featurize import compute_features
    from g2is_jax.fingerprint import model_fingerprint, model_path
    from g2is_jax.io import check_output_dir
    from g2is_jax.models.loading import load_model
    from g2is_jax.projection import Projector
    from g2is_jax.store import file_sha256

    if args.gradient != "representation" and not (args.checkpoint or args.adapter):
        raise G2ISError("gradient features need the LoRA adapters they are taken with respect "
                        "to: pass --checkpoint RUN/checkpoints/<epoch> or --adapter PEFT_DIR")
    if args.gradient == "adam" and args.checkpoint is None:
        raise G2ISError("--gradient adam needs a warmup --checkpoint (it holds Adam's moments); "
                        "a PEFT adapter has none: use --gradient sgd or sign")
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--dim", args.dim, 1),
                             ("--max-length", args.max_length, 2)):
        if value < low:
            raise G2ISError(f"{flag} must be ≥ {low}, got {value}")
    projector = None if args.gradient == "representation" else Projector(
        kind=args.projection, dim=args.dim, seed=args.seed)
    check_output_dir(args.out, "--out")
    mesh = _scale.setup(args)
    records = load_records(args.data)
    data = Path(args.data)
    # What the rows depend on, by content (g2is_jax.fingerprint): a resume under another model,
    # checkpoint, adapter, tokenizer or data file is refused, however the paths were typed.
    meta = {"model": str(model_path(args.model)),
            "model_fingerprint": model_fingerprint(args.model),
            "data": str(data.resolve()) if data.is_file() else str(args.data),
            "data_sha256": file_sha256(data) if data.is_file() else None,
            "checkpoint_lr": None}
    # Onto the mesh as it loads: a safetensors checkpoint streams each device's block of each
    # tensor, so the host never holds the whole model (GGUF: loaded whole, then placed).
    model, tokenizer = load_model(args.model, dtype=args.dtype, mesh=mesh)
    moments = None
    if args.checkpoint:
        from g2is_jax.train import load_checkpoint

        model, moments, ck = load_checkpoint(model, args.checkpoint)
        meta.update(checkpoint=str(Path(args.checkpoint).resolve()),
                    checkpoint_lr=ck["epoch_mean_lr"], checkpoint_epoch=ck["epoch"])
        if args.gradient != "adam":
            moments = None
    elif args.adapter:
        from g2is_jax.models.peft import load_peft_adapter

        model = load_peft_adapter(model, args.adapter)
        meta.update(adapter=str(Path(args.adapter).resolve()), checkpoint_lr=None)
    path = compute_features(model, tokenizer, records, args.out, gradient=args.gradient,
                            projector=projector, moments=moments, batch_size=args.batch_size,
                            max_length=args.max_length, meta=meta, overwrite=args.overwrite,
                            mesh=mesh, gather=args.gather, feature_dtype=args.feature_dtype)
    if jax.process_index() == 0:
        print(json.dumps({"features": str(path), "n": len(records)}))
    return 0
