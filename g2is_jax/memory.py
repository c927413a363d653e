"""A memory plan before launch: what one device holds for `g2is grads` and a training step.

`memory_plan(cfg, mesh_spec, batch_size=B, max_length=L, ...)` works from a `ModelConfig`
alone (a config.json is enough: no weights are read or made). The model is built abstractly
(`nnx.eval_shape`), its leaves given the shardings the programs use (`sharding.fsdp_shardings`
for the base, adapters and optimizer state replicated, rows over every device), and each
figure says where it comes from:

* ``shapes``: exact, from the abstract shapes and their per-device shard shapes: the base
  weights, the LoRA adapters, Adam's moments (features) or the optimizer state (training: Adam's
  two moments and the gradient accumulator of `optax.MultiSteps`), the batch and the output;
* ``estimate``: activations and temporaries from a per-component count (`_features_estimate`,
  `_train_estimate`): the residuals the backward pass keeps for every layer (the scan stacks
  them), the LM head's logits and their gradient, the per-example gradient rows and their
  flattened copy, the projection's output, and under FSDP the gathered embedding, LM head and
  one layer's weights;
* ``compiled``: XLA's own figure, ``jax.jit(step).lower(<ShapeDtypeStructs with shardings>)
  .compile().memory_analysis()``, of the very programs `g2is grads` and the training loop run
  (`featurize._feature_step`, `train._train_step`), for the mesh's devices: the present
  accelerators when there are enough of them, else as many simulated CPU devices
  (`jax_num_cpu_devices`). XLA:CPU converts bfloat16 operands of dots to float32 (whole
  stacked weights included), so for bfloat16 its temporaries overstate an accelerator's; for
  float32 they are the compiled program's. `tests/test_memory.py` checks the estimate against
  them on the tiny model (within 20%).

Whether a program fits a device is decided on its compiled total when it was compiled for
that kind of accelerator; else on the exact figures plus the estimated temporaries (for float32
compiled on CPU, the larger of that and the compiled total), against the device's memory times
the share a JAX process can use (GPUs: 0.75, JAX's default preallocation,
``XLA_PYTHON_CLIENT_MEM_FRACTION``; TPUs and `device_memory`: all of it). The training step is
planned on the mesh too (rows over every device, the base over ``fsdp``), and, since `g2is
warmup` and `g2is train` run on one device today, on one device as well.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from g2is_jax import sharding as shd
from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.llama import Llama

log = logging.getLogger(__name__)

GiB = 1 << 30
# name -> (label, memory per device in GiB as published, share a JAX process can use)
DEVICES = {
    "h100": ("NVIDIA H100 (80 GB)", 80.0, 0.75),
    "h200": ("NVIDIA H200 (141 GB)", 141.0, 0.75),
    "v5e": ("TPU v5e (16 GB per chip)", 16.0, 1.0),
    "v5p": ("TPU v5p (95 GB per chip)", 95.0, 1.0),
    "v4": ("TPU v4 (32 GB per chip)", 32.0, 1.0),
}
PROGRAMS = ("features", "train")


@dataclasses.dataclass(frozen=True)
class Figure:
    """One component of a program's memory on one device."""

    name: str
    bytes: int
    source: str  # "shapes", "estimate" or "compiled"


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """The memory of one program on one device: exact parts, estimated temporaries and, when
    compiled, XLA's figures (argument, output, temporaries; per device)."""

    name: str
    resident: tuple[Figure, ...]  # from shapes: weights, adapters, optimizer state, batch, output
    temporaries: Figure  # estimated activations and temporaries
    compiled: dict[str, int] | None = None  # memory_analysis(): argument/output/temp/alias bytes
    compiled_on: str | None = None

    @property
    def resident_bytes(self) -> int:
        return sum(f.bytes for f in self.resident)

    @property
    def total_estimate(self) -> int:
        return self.resident_bytes + self.temporaries.bytes

    @property
    def total_compiled(self) -> int | None:
        if self.compiled is None:
            return None
        c = self.compiled
        return c["argument"] + c["output"] + c["temp"] - c["alias"]


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """`memory_plan`'s answer; `describe()` is the text `g2is plan` prints."""

    model: str
    mesh: str
    n_devices: int
    batch_size: int
    rows_per_device: int
    max_length: int
    dtype: str
    lora_rank: int
    lora_targets: tuple[str, ...]
    gradient: str
    n_params: int
    n_lora: int
    programs: tuple[ProgramPlan, ...]
    train_one_device: ProgramPlan | None = None  # how `g2is warmup`/`train` run it today

    def needed(self, program: ProgramPlan) -> tuple[int, str]:
        """(bytes, basis) a fit is decided on: a program compiled for an accelerator, its
        compiled total; compiled on CPU in float32, the larger of that and the exact figures plus
        the estimated temporaries; otherwise (bfloat16 on CPU converts operands to float32, or
        not compiled) the exact figures plus the estimate."""
        compiled, est = program.total_compiled, program.total_estimate
        if compiled is not None and not (program.compiled_on or "").endswith(
                ("CPU device", "CPU devices")):
            return compiled, "compiled"
        if compiled is not None and self.dtype == "float32" and compiled > est:
            return compiled, "compiled (XLA:CPU)"
        return est, "shapes + estimate"

    def fits(self, usable_bytes: float) -> dict[str, bool]:
        """Whether each program (and `train_one_device`) fits `usable_bytes` per device."""
        out = {p.name: self.needed(p)[0] <= usable_bytes for p in self.programs}
        if self.train_one_device is not None:
            out["train_one_device"] = self.needed(self.train_one_device)[0] <= usable_bytes
        return out

    def describe(self, device: str | None = None, device_memory_gb: float | None = None) -> str:
        """The plan as `g2is plan` prints it, with the verdict for `device` (a `DEVICES` name)
        or `device_memory_gb` GiB."""
        return _describe(self, device, device_memory_gb)

    def to_json(self) -> dict[str, Any]:
        def program(p: ProgramPlan) -> dict[str, Any]:
            return {"resident": {f.name: f.bytes for f in p.resident},
                    "temporaries_estimate": p.temporaries.bytes,
                    "total_estimate": p.total_estimate, "compiled": p.compiled,
                    "compiled_on": p.compiled_on, "total_compiled": p.total_compiled,
                    "needed": self.needed(p)[0], "basis": self.needed(p)[1]}

        doc = {k: v for k, v in dataclasses.asdict(self).items()
               if k not in ("programs", "train_one_device")}
        doc["programs"] = {p.name: program(p) for p in self.programs}
        if self.train_one_device is not None:
            doc["train_one_device"] = program(self.train_one_device)
        return doc


# ----------------------------------------------------------------------------- abstract state


def _sds(tree: Any, where: Any) -> Any:
    """`tree`'s leaves as ShapeDtypeStructs carrying `where` (one sharding or a matching tree)."""
    if isinstance(where, NamedSharding):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                            tree)
    return jax.tree.map(lambda s, w: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=w),
                        tree, where)


def _shard_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard:
    with uneven splits the first devices hold the most)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * getattr(leaf.dtype, "itemsize", 8)  # a PRNG key: 8
    return total


@dataclasses.dataclass(frozen=True)
class _State:
    """The abstract inputs of both programs on one mesh."""

    graphdef: Any
    base: Any  # ShapeDtypeStructs with FSDP shardings
    lora: Any  # replicated
    mesh: Mesh
    rows: int  # global rows of a padded batch


def _abstract_state(cfg: ModelConfig, lora: LoraConfig, dtype: str, mesh: Mesh,
                    batch_size: int) -> _State:
    model = nnx.eval_shape(lambda: Llama(cfg, lora, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, lora_abs, base_abs = nnx.split(model, nnx.LoRAParam, ...)  # as `split_lora`
    return _State(graphdef, _sds(base_abs, shd.fsdp_shardings(base_abs, mesh)),
                  _sds(lora_abs, shd.replicated(mesh)), mesh, shd.pad_rows(batch_size, mesh))


def _batch(state: _State, length: int, *, slots: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """A padded batch's arrays, rows over every device. With `slots` (the features program) the
    loss-token slots are as many as the tokens, the largest K a bucket compiles."""
    row = shd.row_sharding(state.mesh)
    shape = (state.rows, length)
    out = {"input_ids": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=row),
           "attention_mask": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=row),
           "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=row)}
    if slots:
        out["target_index"] = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=row)
        out["target_mask"] = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=row)
    return out


def _compile_stats(lowered) -> dict[str, int]:
    ma = lowered.compile().memory_analysis()
    return {"argument": int(ma.argument_size_in_bytes), "output": int(ma.output_size_in_bytes),
            "temp": int(ma.temp_size_in_bytes), "alias": int(ma.alias_size_in_bytes)}


def _features_program(state: _State, gradient: str, dim: int, length: int):
    """(the jitted features program `g2is grads` runs, its abstract arguments)."""
    from g2is_jax.featurize import _feature_step
    from g2is_jax.gradients import AdamMoments
    from g2is_jax.projection import Projector

    projector = Projector(kind="sparse", dim=dim)
    step = _feature_step(state.graphdef, gradient, projector, state.mesh)
    moments = AdamMoments(state.lora, state.lora) if gradient == "adam" else None
    args = (state.lora, state.base, _batch(state, length, slots=True), moments)
    return step, args


def _train_program(state: _State, lora: LoraConfig, length: int):
    """(a function lowering the training step, its abstract arguments, the optimizer state)."""
    from g2is_jax.train import TrainConfig, _train_step, make_optimizer

    optimizer = make_optimizer(TrainConfig(lora=lora))
    rep = shd.replicated(state.mesh)
    opt_state = _sds(jax.eval_shape(optimizer.init, state.lora), rep)
    key = _sds(jax.eval_shape(lambda: jax.random.key(0)), rep)
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    args = (state.lora, opt_state, state.base, _batch(state, length, slots=False), key, lr)
    return (lambda *a: _train_step.lower(state.graphdef, optimizer, *a)), args, opt_state


# ----------------------------------------------------------------------------- the estimate


def _adapted(cfg: ModelConfig, lora: LoraConfig) -> list[tuple[int, int]]:
    """(in, out) of each adapted projection of one layer."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    dims = {"q": (h, cfg.num_heads * d), "k": (h, cfg.num_kv_heads * d),
            "v": (h, cfg.num_kv_heads * d), "o": (cfg.num_heads * d, h), "gate": (h, i),
            "up": (h, i), "down": (i, h)}
    return [dims[t] for t in lora.target_modules]


def _layer_saved(cfg: ModelConfig, lora: LoraConfig, tokens: int, e: int,
                 dropout: bool) -> int:
    """Bytes the backward pass keeps of one layer for one row of `tokens` tokens (activations
    in `e`-byte floats): the layer's input and its normed input, q, k and v, the attention's
    output, the residual after it and its normed input, the MLP's gate, up and product, the
    adapters' rank-r intermediates (and the dropped inputs in training); and the attention
    probabilities, in float32 for the softmax and, when the activations are narrower, their
    cast for the product with v (for float32 the cast is the same array)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    width = 4 * h + nh * d + (nh + 2 * nkv) * d + 3 * i + (2 * h if cfg.sandwich_norms else 0)
    width += len(lora.target_modules) * lora.rank
    if dropout:  # the dropped input of every adapter, kept for its gradient
        width += sum(n_in for n_in, _ in _adapted(cfg, lora))
    probs = 4 + (e if e != 4 else 0)
    return tokens * e * width + nh * tokens * tokens * probs


def _gathered(cfg: ModelConfig, fsdp: int, e: int) -> int:
    """Weights gathered from their FSDP shards while in use: the embedding and the LM head whole,
    and one layer's matrices (the scan gathers layer by layer)."""
    if fsdp <= 1:
        return 0
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = h * (nh + 2 * nkv) * d + nh * d * h + 3 * h * i
    heads = v * h * (1 if cfg.tie_word_embeddings else 2)
    return (heads + layer) * e


def _features_estimate(cfg: ModelConfig, lora: LoraConfig, n_rows: int, tokens: int,
                       dtype: str, n_lora: int, fsdp: int) -> int:
    """Activations and temporaries of the features program on a device holding `n_rows` rows:
    every layer's saved activations, one more layer's worth while its gradient is formed, the
    LM head's float32 logits, log-probabilities and their gradient at every slot, and three
    float32 copies of each row's gradient (the gradient, its feature transform, the flattened
    row the projection reads)."""
    e = np.dtype(jnp.dtype(dtype)).itemsize
    layer = _layer_saved(cfg, lora, tokens, e, dropout=False)
    head = 3 * tokens * cfg.vocab_size * 4
    grads = 3 * n_lora * 4
    per_row = (cfg.num_layers + 1) * layer + head + grads
    return n_rows * per_row + _gathered(cfg, fsdp, e)


def _train_estimate(cfg: ModelConfig, lora: LoraConfig, n_rows: int, tokens: int, dtype: str,
                    n_lora: int, fsdp: int) -> int:
    """Activations and temporaries of a training step on a device holding `n_rows` rows: as the
    features program's per row (dropout masks added, the LM head at every position), plus one
    float32 gradient of the adapters and the optimizer's update of it."""
    e = np.dtype(jnp.dtype(dtype)).itemsize
    layer = _layer_saved(cfg, lora, tokens, e, dropout=lora.dropout > 0)
    head = 3 * tokens * cfg.vocab_size * 4
    per_row = (cfg.num_layers + 1) * layer + head
    return n_rows * per_row + 3 * n_lora * 4 + _gathered(cfg, fsdp, e)


# ----------------------------------------------------------------------------- the plan


def _lora_config(rank: int, targets: Sequence[str] | str, dropout: float) -> LoraConfig:
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise G2ISError(f"lora_rank must be an integer ≥ 1, got {rank!r}", param="lora_rank")
    try:
        return LoraConfig(rank=rank, alpha=4.0 * rank, dropout=dropout,
                          target_modules=tuple(targets))
    except G2ISError as err:
        raise G2ISError(str(err), param="lora_targets") from None


def _check(batch_size: int, max_length: int, dtype: str, gradient: str, dim: int) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 2),
                             ("dim", dim, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise G2ISError(f"{name} must be an integer ≥ {low}, got {value!r}", param=name)
    if dtype not in ("float32", "bfloat16"):
        raise G2ISError(f"dtype must be float32 or bfloat16, got {dtype!r}", param="dtype")
    if gradient not in ("adam", "sgd", "sign"):
        raise G2ISError(f"gradient must be adam, sgd or sign, got {gradient!r}",
                        param="gradient")


def compile_devices(n: int) -> list | None:
    """`n` devices to compile a plan's programs for: the default backend's when it has that
    many, else CPU devices (as many exist); None when neither has `n`."""
    for backend in (None, "cpu"):
        try:
            devices = jax.devices(backend)
        except RuntimeError:
            continue
        if len(devices) >= n:
            return devices[:n]
    return None


def memory_plan(cfg: ModelConfig, mesh: shd.MeshSpec | str, *, batch_size: int,
                max_length: int, dtype: str = "bfloat16", lora_rank: int = 128,
                lora_targets: Sequence[str] | str = ("q", "k", "v", "o"),
                lora_dropout: float = 0.1, gradient: str = "adam", dim: int = 8192,
                n_devices: int | None = None, compile: bool = True,
                devices: Sequence | None = None, model_name: str = "") -> MemoryPlan:
    """The per-device memory of `g2is grads` (`gradient` features of `batch_size` rows of
    `max_length` tokens, projected to `dim`) and of a LoRA training step of the same batch, on
    `mesh` (`"data=4,fsdp=4"`; `n_devices` resolves -1 axes, default the product), with the base
    in `dtype` and adapters of `lora_rank` on `lora_targets` (LESS's defaults).

    No weights are made. With `compile`, both programs are also lowered for the mesh and
    compiled, on `devices` (default `compile_devices`; no compile when too few exist).
    """
    _check(batch_size, max_length, dtype, gradient, dim)
    lora = _lora_config(lora_rank, lora_targets, lora_dropout)
    if not isinstance(mesh, shd.MeshSpec):
        mesh = shd.parse_mesh(mesh)
    fixed = [s for s in (mesh.data, mesh.fsdp) if s != -1]
    size = n_devices if n_devices is not None else math.prod(fixed)
    data, fsdp = mesh.resolve(size)
    if devices is None and compile:
        devices = compile_devices(data * fsdp)
        if devices is None:
            log.warning("%d devices are needed to compile for mesh data=%d,fsdp=%d; "
                        "estimates only", data * fsdp, data, fsdp)
    plans, one = [], None
    # Without devices to compile for, an abstract mesh gives the shardings their shard shapes.
    stand_in = devices is None
    built = _abstract_mesh(data, fsdp) if stand_in else \
        shd.make_mesh(shd.MeshSpec(data, fsdp), list(devices))
    state = _abstract_state(cfg, lora, dtype, built, batch_size)
    n_rows = state.rows // (data * fsdp)
    n_lora = sum(math.prod(x.shape) for x in jax.tree.leaves(state.lora))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.base))
    plans.append(_plan_features(state, cfg, lora, gradient, dim, max_length, dtype, n_rows,
                                n_lora, fsdp, compile and not stand_in, devices))
    plans.append(_plan_train(state, cfg, lora, max_length, dtype, n_rows, n_lora, fsdp,
                             compile and not stand_in, devices))
    if data * fsdp > 1:  # `g2is warmup` / `g2is train` run on one device: plan that too
        solo_devices = devices[:1] if devices is not None else None
        solo_mesh = shd.make_mesh(shd.MeshSpec(1, 1), solo_devices) if solo_devices \
            else _abstract_mesh(1, 1)
        solo = _abstract_state(cfg, lora, dtype, solo_mesh, batch_size)
        one = _plan_train(solo, cfg, lora, max_length, dtype, solo.rows, n_lora, 1,
                          compile and solo_devices is not None, solo_devices)
    return MemoryPlan(
        model=model_name or cfg.model_type, mesh=f"data={data},fsdp={fsdp}",
        n_devices=data * fsdp, batch_size=batch_size, rows_per_device=n_rows,
        max_length=max_length, dtype=dtype, lora_rank=lora.rank,
        lora_targets=tuple(lora.target_modules), gradient=gradient, n_params=n_params,
        n_lora=n_lora, programs=tuple(plans), train_one_device=one)


def _plan_features(state, cfg, lora, gradient, dim, length, dtype, n_rows, n_lora, fsdp,
                   do_compile, devices) -> ProgramPlan:
    step, args = _features_program(state, gradient, dim, length)
    lora_s, base_s, batch_s, moments = args
    out = n_rows * dim * 4 + state.rows  # its rows (float32), every row's finite flag
    resident = [Figure("base weights", _shard_bytes(base_s), "shapes"),
                Figure("LoRA adapters", _shard_bytes(lora_s), "shapes")]
    if moments is not None:
        resident.append(Figure("Adam moments (m, v)", _shard_bytes(moments), "shapes"))
    resident.append(Figure("batch in", _shard_bytes(batch_s), "shapes"))
    resident.append(Figure("features out", out, "shapes"))
    temps = Figure("activations and temporaries",
                   _features_estimate(cfg, lora, n_rows, length, dtype, n_lora, fsdp),
                   "estimate")
    compiled = _compile_stats(step.lower(*args)) if do_compile else None
    return ProgramPlan("features", tuple(resident), temps, compiled,
                       _platform(devices) if compiled else None)


def _plan_train(state, cfg, lora, length, dtype, n_rows, n_lora, fsdp, do_compile,
                devices) -> ProgramPlan:
    lower, args, opt_state = _train_program(state, lora, length)
    lora_s, _, base_s, batch_s, _, _ = args
    resident = (Figure("base weights", _shard_bytes(base_s), "shapes"),
                Figure("LoRA adapters", _shard_bytes(lora_s), "shapes"),
                Figure("optimizer state (Adam m, v; accumulated gradient)",
                       _shard_bytes(opt_state), "shapes"),
                Figure("batch in", _shard_bytes(batch_s), "shapes"))
    temps = Figure("activations and temporaries",
                   _train_estimate(cfg, lora, n_rows, length, dtype, n_lora, fsdp), "estimate")
    compiled = _compile_stats(lower(*args)) if do_compile else None
    return ProgramPlan("train", resident, temps, compiled,
                       _platform(devices) if compiled else None)


def _platform(devices) -> str:
    d = devices[0]
    return f"{len(devices)} {d.platform.upper()} device{'s' if len(devices) > 1 else ''}"


def _abstract_mesh(data: int, fsdp: int):
    """A mesh of the right axes and sizes without devices (`jax.sharding.AbstractMesh`)."""
    from jax.sharding import AbstractMesh, AxisType

    return AbstractMesh((data, fsdp), shd.AXES, axis_types=(AxisType.Auto, AxisType.Auto))


# ----------------------------------------------------------------------------- the text


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def usable_memory(device: str | None, device_memory_gb: float | None) -> tuple[str, float] | None:
    """(label, usable bytes per device) of a named device or a given memory size; None for
    neither."""
    if device_memory_gb is not None:
        if not (isinstance(device_memory_gb, int | float) and device_memory_gb > 0
                and math.isfinite(device_memory_gb)):
            raise G2ISError(f"device_memory must be a positive number of GiB, got "
                            f"{device_memory_gb!r}", param="device_memory")
        return f"{device_memory_gb:g} GiB per device", device_memory_gb * GiB
    if device is None:
        return None
    if device not in DEVICES:
        raise G2ISError(f"unknown device {device!r}; choose from {', '.join(DEVICES)} or give "
                        "device_memory", param="device")
    label, gib, share = DEVICES[device]
    note = f", {share:.0%} usable (JAX's default preallocation)" if share < 1 else ""
    return f"{label}{note}", gib * share * GiB


def _describe(plan: MemoryPlan, device: str | None, device_memory_gb: float | None) -> str:
    targets = ",".join(plan.lora_targets)
    lines = [
        f"g2is plan: {plan.model}: {plan.n_params / 1e9:.2f}B parameters in {plan.dtype}; LoRA "
        f"r={plan.lora_rank} on {targets} ({plan.n_lora / 1e6:.1f}M parameters, float32)",
        f"mesh {plan.mesh} ({plan.n_devices} device{'s' if plan.n_devices > 1 else ''}); batch "
        f"{plan.batch_size} rows ({plan.rows_per_device} per device) x {plan.max_length} "
        f"tokens; {plan.gradient} features",
        "",
        f"{'per device, GiB':<52}{'features':>10}{'train step':>12}  source",
    ]
    feats, train = plan.programs
    names = [f.name for f in feats.resident]
    moments = "Adam moments (m, v)" if "Adam moments (m, v)" in names else None
    rows = [("base weights", "base weights", "base weights"),
            ("LoRA adapters", "LoRA adapters", "LoRA adapters"),
            ("Adam moments / optimizer state", moments,
             "optimizer state (Adam m, v; accumulated gradient)"),
            ("batch in", "batch in", "batch in"),
            ("features out", "features out", None)]

    def get(program: ProgramPlan, name: str | None) -> str:
        found = [f.bytes for f in program.resident if f.name == name]
        return _gib(found[0]) if found else "-"

    for label, fname, tname in rows:
        lines.append(f"  {label:<50}{get(feats, fname):>10}{get(train, tname):>12}  shapes")
    lines.append(f"  {'activations and temporaries':<50}{_gib(feats.temporaries.bytes):>10}"
                 f"{_gib(train.temporaries.bytes):>12}  estimate")
    lines.append(f"  {'total':<50}{_gib(feats.total_estimate):>10}"
                 f"{_gib(train.total_estimate):>12}")
    if feats.compiled is not None:
        lines.append(f"  {'compiled temporaries':<50}{_gib(feats.compiled['temp']):>10}"
                     f"{_gib(train.compiled['temp']):>12}  compiled")
        lines.append(f"  {'compiled total (arguments + outputs + temporaries)':<50}"
                     f"{_gib(feats.total_compiled):>10}{_gib(train.total_compiled):>12}"
                     "  compiled")
        on = feats.compiled_on or ""
        note = (" (XLA:CPU converts bfloat16 dot operands to float32, weights included, so "
                "these overstate an accelerator's)" if "CPU" in on and plan.dtype == "bfloat16"
                else "")
        lines.append(f"  compiled for {on}{note}")
    else:
        lines.append("  not compiled (too few devices for this mesh, or compile=False)")
    if plan.train_one_device is not None:
        one = plan.train_one_device
        lines.append(f"  g2is warmup / g2is train run on one device: a step of {plan.batch_size} "
                     f"rows needs {_gib(plan.needed(one)[0])} GiB there ({plan.needed(one)[1]})")
    target = usable_memory(device, device_memory_gb)
    lines.append("")
    if target is None:
        lines.append("no device named: pass --device (h100, h200, v5e, v5p, v4) or "
                     "--device-memory GB for a verdict")
        return "\n".join(lines)
    label, usable = target
    lines.append(f"device: {label}: {_gib(usable)} GiB per device")
    mesh_step = "a training step on this mesh*" if plan.train_one_device is not None \
        else "g2is warmup / train"
    verdicts = [("g2is grads (features)", feats), (mesh_step, train)]
    if plan.train_one_device is not None:
        verdicts.append(("g2is warmup / train (one device)", plan.train_one_device))
    for what, program in verdicts:
        need, basis = plan.needed(program)
        word = "FITS" if need <= usable else "DOES NOT FIT"
        margin = (f"{_gib(usable - need)} GiB free" if need <= usable
                  else f"{_gib(need - usable)} GiB over")
        lines.append(f"  {what:<36} {word:<13} {_gib(need)} of {_gib(usable)} GiB, {margin} "
                     f"({basis})")
    if plan.train_one_device is not None:
        lines.append("  * g2is warmup and g2is train do not shard yet: they run on one device")
    return "\n".join(lines)
