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
        if not 0.0 < self.fraction <= 1.0:
            raise G2ISError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise G2ISError("epochs, batch_size and grad_accum must be ≥ 1")
        if self.schedule not in ("linear", "cosine"):
            raise G2ISError(f"schedule must be linear or cosine, got {self.schedule!r}")
        if self.learning_rate <= 0:
            raise G2ISError(f"learning rate must be > 0, got {self.learning_rate}")

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


def sample_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted indices of a seeded random `fraction` of n records (at least one)."""
    k = max(1, int(round(n * fraction)))
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def make_schedule(cfg: TrainConfig, total_updates: int) -> optax.Schedule:
    warm = int(np.ceil(cfg.warmup_ratio * total_updates))
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


@functools.lru_cache(maxsize=None)
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

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = with_lora(model, cfg.lora, seed=cfg.seed)
    chosen = sample_indices(len(records), cfg.fraction, cfg.seed)
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
    updates_per_epoch = max(n_micro // cfg.grad_accum, 1)
    schedule = make_schedule(cfg, updates_per_epoch * cfg.epochs)
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
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        batches = make_batches(encoded, batch_size=cfg.batch_size, buckets=buckets, pad_id=pad,
                               shuffle_seed=cfg.seed + epoch)
        lrs, ep_losses, tokens, t0 = [], [], 0, time.perf_counter()
        bar = progress_bar(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch",
                           enabled=progress)
        for i, b in enumerate(bar):
            lr = float(schedule(int(opt_state.gradient_step)))
            if (i + 1) % cfg.grad_accum == 0 or cfg.grad_accum == 1:
                lrs.append(lr)
            batch = {"input_ids": b.input_ids, "attention_mask": b.attention_mask,
                     "loss_mask": b.loss_mask}
            step_key = jax.random.fold_in(jax.random.fold_in(key, epoch), i)
            lora, opt_state, loss = _train_step(graphdef, optimizer, lora, opt_state, base,
                                                batch, step_key, np.float32(lr))
            ep_losses.append(float(loss))
            tokens += int(b.attention_mask.sum())
            bar.set_postfix(loss=f"{ep_losses[-1]:.3f}",
                            tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
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
    mngr.wait_until_finished()
    mngr.close()
    return TrainResult(nnx.merge(graphdef, lora, base), checkpoints, epoch_lrs, losses)


def _check_run_info(out: Path, info: dict[str, Any]) -> None:
    path = out / "run_info.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(info)):
            diff = sorted(k for k in set(old) | set(info) if old.get(k) != info.get(k))
            raise G2ISError(
                f"{out} holds a training run with other settings (differs in {diff}); "
                "use a new --out directory or delete the old one")
    else:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=1))
        tmp.replace(path)


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
    return json.loads(path.read_text())


def load_checkpoint(model: Llama, ckpt: str | Path) -> tuple[Llama, AdamMoments, dict[str, Any]]:
    """(model with the checkpoint's adapters, Adam moments, meta) from RUN/checkpoints/<epoch>."""
    from g2is_jax.models.llama import with_lora

    ckpt = Path(ckpt).absolute()
    meta = load_checkpoint_meta(ckpt)
    cfg = TrainConfig.from_json(meta["train_config"])
    model = with_lora(model, cfg.lora, seed=cfg.seed)
    graphdef, base, lora = split_lora(model)
    opt_state = make_optimizer(cfg).init(lora)
    try:
        got = ocp.StandardCheckpointer().restore(ckpt / "state",
                                                 _abstract_state(lora, opt_state))
    except (ValueError, KeyError) as exc:
        raise G2ISError(f"checkpoint {ckpt} does not fit this model/LoRA shape: {exc}") from exc
    nnx.replace_by_pure_dict(lora, got["lora"])
    return nnx.merge(graphdef, lora, base), adam_moments(got["opt_state"]), meta


__all__ = ["TRAIN_PRESETS", "TrainConfig", "TrainResult", "adam_moments", "load_checkpoint",
           "make_schedule", "sample_indices", "train_lora"]
