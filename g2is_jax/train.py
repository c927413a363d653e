"""LoRA training with optax and orbax: LESS's warmup and the final fine-tune.

Only the adapters train: the step is a pure function of (lora, opt_state, base, batch, key),
jitted once per length bucket, with gradient accumulation through `optax.MultiSteps`. After each
epoch an orbax checkpoint holds the LoRA params, the optimizer state (Adam's moments, which the
`adam` gradient features need), the step, the epoch's mean learning rate, the configs and the
ids of the records trained on. Run again with the same arguments, training continues from the
latest checkpoint; with other arguments it refuses instead of mixing runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

from g2is_jax.data import Record, encode_records, length_buckets, make_batches
from g2is_jax.errors import G2ISError
from g2is_jax.gradients import AdamMoments
from g2is_jax.io import atomic_write_json, make_dir
from g2is_jax.models.config import LoraConfig
from g2is_jax.models.llama import Llama
from g2is_jax.models.lora import split_lora, token_mean_loss
from g2is_jax.progress import progress_bar

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """LESS's warmup defaults; `TRAIN_PRESETS` holds smaller ones for CPU."""

    fraction: float = 0.05  # of the pool, sampled with `seed` (1.0 = all records)
    epochs: int = 4
    learning_rate: float = 2e-5
    schedule: str = "linear"  # "linear" decay or "cosine", both after a linear warmup
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    batch_size: int = 1  # records per micro-batch (one compiled step per length bucket)
    grad_accum: int = 128  # micro-batches per optimizer update: effective batch 128
    max_length: int = 2048
    seed: int = 0
    lora: LoraConfig = LoraConfig()

    def __post_init__(self):
        for name in ("epochs", "batch_size", "grad_accum", "max_length", "seed"):
            value = getattr(self, name)
            low = {"max_length": 2, "seed": 0}.get(name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise G2ISError(f"{name} must be an integer ≥ {low}, got {value!r}")
        _check_float("fraction", self.fraction, 0.0, 1.0, low_open=True)
        _check_float("learning_rate", self.learning_rate, 0.0, math.inf, low_open=True)
        _check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0, high_open=True)
        _check_float("weight_decay", self.weight_decay, 0.0, math.inf)
        if self.schedule not in ("linear", "cosine"):
            raise G2ISError(f"schedule must be linear or cosine, got {self.schedule!r}")
        if not isinstance(self.lora, LoraConfig):
            raise G2ISError(f"lora must be a LoraConfig, got {type(self.lora).__name__}")
        _check_float("lora.alpha", self.lora.alpha, 0.0, math.inf, low_open=True)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        lora = dict(d.pop("lora"))
        lora["target_modules"] = tuple(lora["target_modules"])
        return cls(**d, lora=LoraConfig(**lora))


def _check_float(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high)
    if not ok:
        lo, hi = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        raise G2ISError(f"{name} must be a finite number in {lo}{low:g}, {high:g}{hi}, got "
                        f"{value!r}")


TRAIN_PRESETS: dict[str, TrainConfig] = {
    "less": TrainConfig(),
    # The paper's fine-tune on the selection: all of it, 3 epochs, cosine.
    "finetune": TrainConfig(fraction=1.0, epochs=3, schedule="cosine"),
    # Small enough for 2 CPU cores and the 135M model.
    "cpu": TrainConfig(epochs=2, learning_rate=2e-4, batch_size=8, grad_accum=2,
                       max_length=128, lora=LoraConfig(rank=8, alpha=32.0, dropout=0.1)),
    "cpu-finetune": TrainConfig(fraction=1.0, epochs=3, schedule="cosine", learning_rate=5e-4,
                                batch_size=8, grad_accum=1, max_length=128,
                                lora=LoraConfig(rank=8, alpha=32.0, dropout=0.1)),
}


# The fields a training request may override, by the names every door uses (CLI flags map to
# them: --lr is learning_rate, --lora-rank is lora_rank, ...).
TRAIN_OVERRIDES = ("fraction", "epochs", "learning_rate", "schedule", "warmup_ratio",
                   "weight_decay", "batch_size", "grad_accum", "max_length", "seed", "lora_rank",
                   "lora_alpha", "lora_dropout", "lora_targets")


def resolve_train_config(preset: str, **overrides: Any) -> TrainConfig:
    """The one resolution of a training request: `TRAIN_PRESETS[preset]` with the fields in
    `overrides` (names in `TRAIN_OVERRIDES`) replaced; a value of None keeps the preset's.
    `g2is warmup`, `g2is train` and `g2is run` (`TrainSection`) all resolve through here.

    A `lora_rank` override without `lora_alpha` keeps the preset's alpha/rank ratio, the LoRA
    scaling: alpha = rank * preset_alpha / preset_rank (preset less, r=128 alpha=512, at rank 8
    gives alpha 32). The adapter adds (alpha/rank)·B·A to a weight, and Adam's step on A and B
    does not depend on their scale, so the change a step makes to the weight grows with
    alpha/rank: holding the ratio fixed keeps the preset's learning rate tuned and changes only
    the adapter's capacity. An explicit `lora_alpha` wins. `lora_targets` is a comma-separated
    string or a sequence of module names (q, k, v, o, gate, up, down).
    """
    if preset not in TRAIN_PRESETS:
        raise G2ISError(f"unknown training preset {preset!r}; use one of "
                        f"{', '.join(TRAIN_PRESETS)}")
    unknown = sorted(set(overrides) - set(TRAIN_OVERRIDES))
    if unknown:
        raise G2ISError(f"unknown training field(s) {unknown}; valid: {', '.join(TRAIN_OVERRIDES)}")
    base = TRAIN_PRESETS[preset]
    over = {k: v for k, v in overrides.items() if v is not None}
    rank = over.pop("lora_rank", base.lora.rank)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise G2ISError(f"lora_rank must be an integer ≥ 1, got {rank!r}")
    alpha = over.pop("lora_alpha", None)
    if alpha is None:  # keep the preset's scaling alpha/rank
        alpha = base.lora.alpha * rank / base.lora.rank
    targets = over.pop("lora_targets", base.lora.target_modules)
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    lora = LoraConfig(rank=rank, alpha=alpha, dropout=over.pop("lora_dropout", base.lora.dropout),
                      target_modules=tuple(targets))
    return dataclasses.replace(base, **over, lora=lora)


def sample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of a seeded random `fraction` of n records (at least one)."""
    k = max(1, int(round(n * fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def make_schedule(cfg: TrainConfig, total_updates: int) -> optax.Schedule:
    # The warmup starts at lr 0; at least one update runs after it (a 1-update run would
    # otherwise train at lr 0 only).
    warm = min(int(np.ceil(cfg.warmup_ratio * total_updates)), max(total_updates - 1, 0))
    decay = max(total_updates - warm, 1)
    if cfg.schedule == "cosine":
        tail = optax.cosine_decay_schedule(cfg.learning_rate, decay)
    else:
        tail = optax.linear_schedule(cfg.learning_rate, 0.0, decay)
    if warm == 0:
        return tail
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warm), tail],
                                [warm])


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW without its learning rate, with `cfg.grad_accum`-step accumulation.

    The step multiplies the update by -lr, the schedule's value passed in as a traced scalar
    (optax.adamw = scale_by_adam → add_decayed_weights → scale by -lr), so the optimizer depends
    only on (weight decay, accumulation): one object per pair, and one compiled step serves every
    run that shares them (each fine-tune of a method comparison), not one compile per schedule.
    """
    return _optimizer(float(cfg.weight_decay), int(cfg.grad_accum))


# Bounded: one entry per (weight decay, accumulation) pair a process trains with.
@functools.lru_cache(maxsize=8)
def _optimizer(weight_decay: float, grad_accum: int) -> optax.GradientTransformation:
    # eps 1e-8 and b1/b2 as transformers' AdamW, whose moments LESS reads.
    inner = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                        optax.add_decayed_weights(weight_decay))
    return optax.MultiSteps(inner, every_k_schedule=grad_accum)


def adam_moments(opt_state: Any) -> AdamMoments:
    """Adam's mu and nu from an optax state (wherever they sit in the state tree)."""
    def is_adam(node):
        return isinstance(node, optax.ScaleByAdamState)

    found = [x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_adam) if is_adam(x)]
    if len(found) != 1:
        raise G2ISError("the checkpoint's optimizer state holds no Adam moments")
    return AdamMoments(found[0].mu, found[0].nu)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _train_step(graphdef, optimizer, lora, opt_state, base, batch, key, lr):
    loss_fn = token_mean_loss(graphdef)
    loss, grads = jax.value_and_grad(loss_fn)(lora, base, batch, key)
    # MultiSteps emits zeros until the accumulation's last micro-batch, which applies
    # the schedule's lr at the update count (as optax's scale_by_learning_rate would).
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    updates = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
    return optax.apply_updates(lora, updates), opt_state, loss


@dataclasses.dataclass
class TrainResult:
    model: Llama
    checkpoints: list[Path]
    epoch_lrs: list[float]
    losses: list[float]  # mean training loss per epoch


def _manager(out: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        (out / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
    )


def checkpoint_dir(out: Path, epoch: int) -> Path:
    return (out / "checkpoints" / str(epoch)).absolute()


def train_lora(model: Llama, tokenizer, records: Sequence[Record], out: str | Path,
               cfg: TrainConfig, *, run_info: dict[str, Any] | None = None,
               progress: bool = True) -> TrainResult:
    """Train fresh LoRA adapters on a seeded `cfg.fraction` of `records`; checkpoint per epoch.

    `model` supplies the base weights (its adapters, if any, are replaced by `cfg.lora`).
    Resumes from the latest checkpoint under `out` when one exists with the same config.
    """
    from g2is_jax.models.llama import with_lora

    if not records:
        raise G2ISError("no records to train on")
    out = make_dir(out)
    model = with_lora(model, cfg.lora, seed=cfg.seed)
    chosen = sample_indices(len(records), cfg.fraction, cfg.seed)
    if len(records) * cfg.fraction < 1:
        log.warning("fraction %g of %d records is %.2g records: training on 1 record",
                    cfg.fraction, len(records), len(records) * cfg.fraction)
    subset = [records[i] for i in chosen]
    ids = [r.id for r in subset]
    info = {"train_config": cfg.to_json(), "record_ids": ids, **(run_info or {})}
    _check_run_info(out, info)

    encoded, report = encode_records(subset, tokenizer, max_length=cfg.max_length,
                                     progress=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    buckets = length_buckets(cfg.max_length)
    n_micro = len(make_batches(encoded, batch_size=cfg.batch_size, buckets=buckets, pad_id=pad,
                               shuffle_seed=cfg.seed))
    if n_micro * cfg.epochs < cfg.grad_accum:
        raise G2ISError(
            f"{len(subset)} record(s) in {n_micro} micro-batch(es) of batch_size {cfg.batch_size} "
            f"over {cfg.epochs} epoch(s) never fill one optimizer update of grad_accum "
            f"{cfg.grad_accum}: nothing would train; lower grad_accum or batch_size, or raise "
            "fraction")
    # Accumulation carries over epoch ends (optax.MultiSteps keeps its count), so the run makes
    # exactly this many optimizer updates; the schedule spans them.
    total_updates = n_micro * cfg.epochs // cfg.grad_accum
    if n_micro < cfg.grad_accum:
        log.warning("%d micro-batch(es) per epoch, fewer than grad_accum %d: optimizer updates "
                    "span epochs (%d in all)", n_micro, cfg.grad_accum, total_updates)
    schedule = make_schedule(cfg, total_updates)
    optimizer = make_optimizer(cfg)
    graphdef, base, lora = split_lora(model)
    opt_state = optimizer.init(lora)

    mngr = _manager(out)
    start_epoch = 0
    checkpoints, epoch_lrs, losses = [], [], []
    if mngr.latest_step() is not None:
        start_epoch = mngr.latest_step()
        lora, opt_state, meta = _restore(mngr, start_epoch, lora, opt_state)
        log.info("resuming from %s (epoch %d done)", checkpoint_dir(out, start_epoch),
                 start_epoch)
        for e in range(1, start_epoch + 1):
            m = load_checkpoint_meta(checkpoint_dir(out, e))
            checkpoints.append(checkpoint_dir(out, e))
            epoch_lrs.append(m["epoch_mean_lr"])
            losses.append(m["epoch_loss"])

    key = jax.random.key(cfg.seed)
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            batches = make_batches(encoded, batch_size=cfg.batch_size, buckets=buckets,
                                   pad_id=pad, shuffle_seed=cfg.seed + epoch)
            lrs, ep_losses, tokens, t0 = [], [], 0, time.perf_counter()
            bar = progress_bar(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                               enabled=progress)
            for i, b in enumerate(bar):
                update = int(opt_state.gradient_step)
                lr = float(schedule(update))
                batch = {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                         "loss_mask": b.loss_mask}
                step_key = jax.random.fold_in(jax.random.fold_in(key, epoch), i)
                lora, opt_state, loss = _train_step(graphdef, optimizer, lora, opt_state, base,
                                                    batch, step_key, np.float32(lr))
                if int(opt_state.gradient_step) > update:  # this micro-batch applied an update
                    lrs.append(lr)
                ep_losses.append(float(loss))
                if not math.isfinite(ep_losses[-1]):
                    _diverged(out, epoch, f"the loss is {ep_losses[-1]} at micro-batch {i + 1}"
                              f"/{len(batches)} (optimizer update {int(opt_state.gradient_step)},"
                              f" lr {lr:.3g})", cfg)
                tokens += int(b.attention_mask.sum())
                bar.set_postfix(loss=f"{ep_losses[-1]:.3f}",
                                tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
            if not _all_finite(lora):
                _diverged(out, epoch, "the adapter weights became non-finite in the last update",
                          cfg)
            meta = {
                "epoch": epoch,
                "step": int(opt_state.gradient_step),
                "epoch_mean_lr": float(np.mean(lrs)) if lrs else 0.0,
                "epoch_loss": float(np.mean(ep_losses)),
                **info,
            }
            _save(mngr, epoch, lora, opt_state, meta)
            checkpoints.append(checkpoint_dir(out, epoch))
            epoch_lrs.append(meta["epoch_mean_lr"])
            losses.append(meta["epoch_loss"])
            log.info("epoch %d: loss %.4f, mean lr %.3g", epoch, meta["epoch_loss"],
                     meta["epoch_mean_lr"])
    finally:
        mngr.wait_until_finished()
        mngr.close()
    return TrainResult(nnx.merge(graphdef, lora, base), checkpoints, epoch_lrs, losses)


def _all_finite(tree: Any) -> bool:
    return all(bool(jax.numpy.isfinite(x).all()) for x in jax.tree_util.tree_leaves(tree))


def _diverged(out: Path, epoch: int, what: str, cfg: TrainConfig) -> None:
    """Stop a diverged run: nothing of this epoch is saved, earlier checkpoints stay."""
    kept = (f"the last finite checkpoint is {checkpoint_dir(out, epoch - 1)}" if epoch > 1
            else "no checkpoint was written")
    raise G2ISError(f"training diverged in epoch {epoch}: {what}; stopped, {kept}. Lower "
                    f"learning_rate (now {cfg.learning_rate:g}) and train into a new output "
                    "directory")


# A path in run_info and the content fingerprint that stands for it when present: the path is
# for people, the content is compared (so `dir/` and `dir` are one model, a moved file is fine).
_RUN_INFO_PATHS = {"model": "model_fingerprint", "data": "data_sha256"}
_RUN_INFO_NAMES = {"model_fingerprint": "the model's weights/config/tokenizer files",
                   "data_sha256": "the data file's content", "record_ids": "the records sampled",
                   "train_config": "the training config"}


def _check_run_info(out: Path, info: dict[str, Any]) -> None:
    path = out / "run_info.json"
    new = json.loads(json.dumps(info))
    if not path.exists():
        atomic_write_json(path, new)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise G2ISError(f"cannot read {path} ({e}); train into a new output directory") from None
    if not isinstance(old, dict):
        raise G2ISError(f"{path} is not a run_info object; train into a new output directory")
    skip = {k for k, fp in _RUN_INFO_PATHS.items() if old.get(fp) and new.get(fp)}
    diff = sorted(k for k in set(old) | set(new) if k not in skip and old.get(k) != new.get(k))
    if diff:
        what = ", ".join(_RUN_INFO_NAMES.get(k, k) for k in diff)
        if "train_config" in diff and isinstance(old.get("train_config"), dict):
            fields = sorted(k for k in set(old["train_config"]) | set(new["train_config"])
                            if old["train_config"].get(k) != new["train_config"].get(k))
            what = what.replace("the training config", f"the training config ({fields})")
        raise G2ISError(f"{out} holds a training run with other settings (changed: {what}); "
                        "refusing to mix them: use a new --out directory or delete the old one")


def _save(mngr, epoch, lora, opt_state, meta):
    mngr.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"lora": lora.to_pure_dict(), "opt_state": opt_state}),
        meta=ocp.args.JsonSave(meta)))
    mngr.wait_until_finished()


def _abstract_state(lora, opt_state):
    """The restore target: shapes and dtypes of what `_save` writes."""
    target = {"lora": lora.to_pure_dict(), "opt_state": opt_state}
    return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)


def _restore(mngr, epoch, lora, opt_state):
    got = mngr.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract_state(lora, opt_state)),
        meta=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(lora, got["state"]["lora"])
    return lora, got["state"]["opt_state"], got["meta"]


def load_checkpoint_meta(ckpt: str | Path) -> dict[str, Any]:
    path = Path(ckpt) / "meta" / "metadata"
    if not path.exists():
        cands = list(Path(ckpt).glob("meta/*"))
        if not cands:
            raise G2ISError(f"{ckpt} is not a g2is checkpoint (no meta/); pass a directory "
                            "like RUN/checkpoints/<epoch>")
        path = cands[0]
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise G2ISError(f"cannot read the checkpoint meta {path} ({type(e).__name__}); the "
                        "checkpoint is damaged: train again into a new directory") from None
    lr = meta.get("epoch_mean_lr") if isinstance(meta, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("train_config"), dict) or \
            not isinstance(meta.get("epoch"), int):
        raise G2ISError(f"{path} is not a g2is checkpoint meta (no train_config/epoch); pass a "
                        "directory like RUN/checkpoints/<epoch>")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
        raise G2ISError(f"checkpoint {ckpt} records a learning rate of {lr!r} (a diverged or "
                        "damaged warmup); train it again with a finite learning rate")
    return meta


def load_checkpoint(model: Llama, ckpt: str | Path) -> tuple[Llama, AdamMoments, dict[str, Any]]:
    """(model with the checkpoint's adapters, Adam moments, meta) from RUN/checkpoints/<epoch>."""
    from g2is_jax.models.llama import with_lora

    ckpt = Path(ckpt).absolute()
    meta = load_checkpoint_meta(ckpt)
    try:
        cfg = TrainConfig.from_json(meta["train_config"])
    except (KeyError, TypeError) as e:
        raise G2ISError(f"checkpoint {ckpt}: its train_config is damaged ({e}); train again") \
            from None
    model = with_lora(model, cfg.lora, seed=cfg.seed)
    graphdef, base, lora = split_lora(model)
    opt_state = make_optimizer(cfg).init(lora)
    try:
        got = ocp.StandardCheckpointer().restore(ckpt / "state",
                                                 _abstract_state(lora, opt_state))
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise G2ISError(f"checkpoint {ckpt} does not fit this model/LoRA shape or is damaged "
                        f"({first}); pass the model it was trained from") from None
    nnx.replace_by_pure_dict(lora, got["lora"])
    if not _all_finite(got["lora"]):
        raise G2ISError(f"checkpoint {ckpt} holds non-finite adapter weights (a diverged "
                        "warmup); train it again with a lower learning rate")
    return nnx.merge(graphdef, lora, base), adam_moments(got["opt_state"]), meta


__all__ = ["TRAIN_OVERRIDES", "TRAIN_PRESETS", "TrainConfig", "TrainResult", "adam_moments",
           "load_checkpoint", "make_schedule", "resolve_train_config", "sample_indices",
           "train_lora"]
