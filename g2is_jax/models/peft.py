"""LoRA adapters in PEFT's on-disk format, both ways.

A PEFT adapter directory holds ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` with one pair of
factors per adapted linear layer::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

Ours are ``lora_a`` [in, r] and ``lora_b`` [r, out] on the same layers, so the mapping is a
rename plus a transpose, and ``y = x W + x A B · alpha/r`` is the same function on both sides.
Adapters therefore move between g2is_jax and the PyTorch tools (PEFT, LLaMA-Factory, vLLM).

Scaling: rsLoRA adapters (``use_rslora: true``, scale ``alpha/sqrt(r)``) are imported exactly, as
a `LoraConfig` whose alpha is ``lora_alpha * sqrt(r)`` (so ``alpha/r`` equals PEFT's scale); they
export back as plain LoRA with that alpha, which PEFT loads to the same function. Features with no
counterpart here (DoRA, per-module ranks or alphas, a subset of layers, trained biases, extra
trained modules) are refused with a `G2ISError` naming the file, never silently dropped.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LORA_MODULES, LoraConfig
from g2is_jax.models.llama import BASE_FILTER, Llama, LoRALinear, build_model
from g2is_jax.models.loading import read_json_object

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "load_peft_adapter",
    "lora_config_from_peft",
    "peft_tensor_names",
    "save_peft_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_GROUP = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn",
          "gate": "mlp", "up": "mlp", "down": "mlp"}
_TENSOR_RE = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)_proj"
    r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
# adapter_config.json fields with no counterpart here -> the values we accept (first: ours).
_UNSUPPORTED = {
    "use_dora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "layers_to_transform": (None,),
    "modules_to_save": (None, []),
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
}


def _module(model: Llama, target: str) -> LoRALinear:
    """The stacked projection `target` of every layer (factors [L, in, r] and [L, r, out])."""
    return getattr(getattr(model.layers, _GROUP[target]), f"{target}_proj")


def peft_tensor_names(layer: int, target: str) -> tuple[str, str]:
    """PEFT's names of the (A, B) factors of `target` ("q", ..., "down") in `layer`."""
    pre = f"base_model.model.model.layers.{layer}.{_GROUP[target]}.{target}_proj"
    return f"{pre}.lora_A.weight", f"{pre}.lora_B.weight"


# ------------------------------------------------------------------------------------------------
# Export


def save_peft_adapter(model: Llama, directory: str | Path, *,
                      base_model_name_or_path: str | None = None) -> Path:
    """Write `model`'s adapters as a PEFT LoRA adapter directory; returns the directory."""
    from safetensors.numpy import save

    from g2is_jax.io import atomic_write, atomic_write_json

    lora = model.lora_config
    if lora is None:
        raise G2ISError("the model has no LoRA adapters to save; build it with a LoraConfig")
    out = Path(directory).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target in lora.target_modules:
        mod = _module(model, target)
        a = np.asarray(mod.lora_a[...], np.float32)
        b = np.asarray(mod.lora_b[...], np.float32)
        for i in range(model.config.num_layers):
            name_a, name_b = peft_tensor_names(i, target)
            tensors[name_a] = np.ascontiguousarray(a[i].T)
            tensors[name_b] = np.ascontiguousarray(b[i].T)
    alpha = float(lora.alpha)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(f"{m}_proj" for m in lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    # Weights first, config last, each atomically: a directory with a config always has its
    # whole weights file.
    atomic_write(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out / ADAPTER_CONFIG, config, indent=2)
    return out


# ------------------------------------------------------------------------------------------------
# Import


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / ADAPTER_CONFIG
    if not path.is_file():
        raise G2ISError(f"{path} does not exist: {directory} is not a PEFT adapter directory "
                        f"(it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return read_json_object(path)


def _targets(spec: Any, path: Path) -> tuple[str, ...]:
    """Our target names for PEFT's `target_modules` (a list of suffixes, a regex, 'all-linear')."""
    full = {m: f"model.layers.0.{_GROUP[m]}.{m}_proj" for m in LORA_MODULES}
    if spec == "all-linear":
        return LORA_MODULES
    if isinstance(spec, str):
        try:
            found = tuple(m for m, name in full.items() if re.fullmatch(spec, name))
        except re.error as err:
            raise G2ISError(f"{path}: target_modules {spec!r} is not a valid regex") from err
        if not found:
            raise G2ISError(f"{path}: target_modules {spec!r} matches none of the model's "
                            f"projections ({', '.join(f'{m}_proj' for m in LORA_MODULES)})")
        return found
    if not isinstance(spec, list) or not spec or not all(isinstance(s, str) for s in spec):
        raise G2ISError(f"{path}: target_modules must be a non-empty list of module names")
    found, lacking = [], []
    for entry in spec:
        # PEFT matches a list entry against the end of each module's dotted name.
        hits = [m for m, name in full.items() if name == entry or name.endswith("." + entry)]
        if hits:
            found.extend(hits)
        else:
            lacking.append(entry)
    if lacking:
        raise G2ISError(
            f"{path}: the adapter targets module(s) the model lacks or g2is_jax cannot adapt: "
            f"{lacking}; LoRA is supported on {', '.join(f'{m}_proj' for m in LORA_MODULES)}")
    return tuple(m for m in LORA_MODULES if m in found)


def lora_config_from_peft(directory: str | Path) -> LoraConfig:
    """The `LoraConfig` of a PEFT LoRA adapter directory (rsLoRA folded into alpha)."""
    directory = Path(directory).expanduser()
    cfg = _read_config(directory)
    path = directory / ADAPTER_CONFIG
    if cfg.get("peft_type") != "LORA":
        raise G2ISError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters "
                        f"(peft_type 'LORA') can be loaded")
    for key, defaults in _UNSUPPORTED.items():
        if cfg.get(key, defaults[0]) not in defaults:
            raise G2ISError(f"{path}: {key} = {cfg[key]!r} is not supported by g2is_jax's "
                            f"LoRA (it supports {key} = {defaults[0]!r})")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha", 8)
    dropout = cfg.get("lora_dropout", 0.0)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise G2ISError(f"{path}: r must be a positive integer, got {rank!r}")
    for key, value in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise G2ISError(f"{path}: {key} must be a number, got {value!r}")
    if cfg.get("use_rslora", False):
        alpha = alpha * math.sqrt(rank)  # PEFT scales by alpha/sqrt(r); ours is alpha/r
    targets = _targets(cfg.get("target_modules"), path)
    try:
        return LoraConfig(rank=rank, alpha=float(alpha), dropout=float(dropout),
                          target_modules=targets)
    except G2ISError as err:
        raise G2ISError(f"{path}: {err}") from err


def _read_factors(directory: Path) -> dict[tuple[int, str, str], np.ndarray]:
    """(layer, target, "A"|"B") -> array, from adapter_model.safetensors."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = directory / ADAPTER_WEIGHTS
    if not path.is_file():
        hint = (" (only adapter_model.bin is there: re-save it with PEFT's "
                "save_pretrained(..., safe_serialization=True))"
                if (directory / "adapter_model.bin").is_file() else "")
        raise G2ISError(f"{path} does not exist{hint}")
    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise G2ISError(f"{path} is not a readable safetensors file ({err})") from err
    factors, unknown = {}, []
    for name, arr in raw.items():
        m = _TENSOR_RE.match(name)
        if m is None or m.group(3) not in _GROUP or _GROUP[m.group(3)] != m.group(2):
            unknown.append(name)
        else:
            factors[int(m.group(1)), m.group(3), m.group(4)] = arr
    if unknown:
        raise G2ISError(f"{path} holds tensors g2is_jax cannot map to LoRA factors of q/k/v/o/"
                        f"gate/up/down projections: {unknown[:4]}{' ...' * (len(unknown) > 4)}")
    return factors


def load_peft_adapter(model: Llama, directory: str | Path) -> Llama:
    """A new model with `model`'s base weights and the PEFT adapter in `directory`.

    Any adapters `model` already has are replaced. The result computes what PEFT's
    ``PeftModel.from_pretrained(base, directory)`` computes.
    """
    directory = Path(directory).expanduser()
    lora = lora_config_from_peft(directory)
    factors = _read_factors(directory)
    path = directory / ADAPTER_WEIGHTS
    cfg = model.config
    extra = sorted({layer for layer, _, _ in factors if layer >= cfg.num_layers})
    if extra:
        raise G2ISError(f"{path} has adapters for layer(s) {extra}, but the model has only "
                        f"{cfg.num_layers} layers: the adapter belongs to another model")
    stray = sorted({t for _, t, _ in factors} - set(lora.target_modules))
    if stray:
        raise G2ISError(f"{path} has factors for {[f'{t}_proj' for t in stray]}, which "
                        f"{ADAPTER_CONFIG} does not list in target_modules")

    out = build_model(cfg, lora, dtype=model.dtype_name, base=nnx.state(model, BASE_FILTER))
    for target in lora.target_modules:
        mod = _module(out, target)
        for side, var in zip("AB", (mod.lora_a, mod.lora_b), strict=True):
            # One stacked factor [L, ...] per side; PEFT stores each layer's transpose of ours.
            stacked = np.empty(var[...].shape, np.float32)
            for i in range(cfg.num_layers):
                name = peft_tensor_names(i, target)["AB".index(side)]
                stacked[i] = _factor(factors, (i, target, side), name,
                                     stacked.shape[1:][::-1], lora, path).T
            var[...] = jnp.asarray(stacked)
    return out


def _factor(factors, key, name: str, want: tuple[int, ...], lora: LoraConfig,
            path: Path) -> np.ndarray:
    arr = factors.get(key)
    if arr is None:
        raise G2ISError(f"{path} lacks tensor {name!r}")
    if tuple(arr.shape) != tuple(want):
        raise G2ISError(
            f"{path}: tensor {name!r} has shape {tuple(arr.shape)}, but r = {lora.rank} "
            f"({ADAPTER_CONFIG}) and this model need {tuple(want)}: the adapter was made for "
            f"another model, or its r is wrong")
    return arr
