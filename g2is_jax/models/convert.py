"""Name and layout mapping between our parameter tree and transformers' state dict.

transformers stores a linear layer's weight as [out, in] under one name per layer
(``model.layers.{i}.self_attn.q_proj.weight``); ours is one stacked kernel [L, in, out] at
``layers.self_attn.q_proj.kernel`` (see `g2is_jax.models.llama`). `hf_layout` lists, for every
leaf of our base state, the transformers names that fill it (one per layer for a stacked leaf)
and whether each is transposed. The same table serves checkpoint loading (HF safetensors, GGUF
after its own renaming) and export (`save_hf_checkpoint`, the PyTorch reference models in the
tests).

Loading is strict: a tensor the config has no place for, or a place no tensor fills, is an
error naming the tensors (a config with fewer layers than its weights would otherwise load
silently and compute a different function).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import ModelConfig
from g2is_jax.models.llama import BASE_FILTER, Llama

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Stored by some exporters, carry no weights (recomputed from the config).
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SHOWN = 4  # tensor names quoted in an error before "and N more"


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One leaf of our base state and the transformers tensors that fill it.

    `names` has one entry for a plain leaf and `num_layers` entries (layer 0 first) for a leaf
    stacked over the layer axis; `transpose` swaps a tensor's two axes ([out, in] -> [in, out]).
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    transpose: bool
    stacked: bool


def _layer_modules(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, bool]]:
    """(our path inside a layer, transformers' suffix, transpose?) for one decoder layer."""
    norms = ["input_layernorm", "post_attention_layernorm"]
    if cfg.sandwich_norms:
        norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
    out = [((n, "scale"), f"{n}.weight", False) for n in norms]
    for p in _ATTN:
        out.append((("self_attn", p, "kernel"), f"self_attn.{p}.weight", True))
        if cfg.attention_bias and (p != "o_proj" or cfg.o_proj_bias):
            out.append((("self_attn", p, "bias"), f"self_attn.{p}.bias", False))
    for p in _MLP:
        out.append((("mlp", p, "kernel"), f"mlp.{p}.weight", True))
    return out


def hf_layout(cfg: ModelConfig) -> list[Leaf]:
    """Every leaf of the base state of a model with config `cfg`, with its transformers names."""
    out = [Leaf(("embed_tokens", "embedding"), ("model.embed_tokens.weight",), False, False),
           Leaf(("norm", "scale"), ("model.norm.weight",), False, False)]
    if not cfg.tie_word_embeddings:
        out.append(Leaf(("lm_head", "kernel"), ("lm_head.weight",), True, False))
    for path, suffix, transpose in _layer_modules(cfg):
        names = tuple(f"model.layers.{i}.{suffix}" for i in range(cfg.num_layers))
        out.append(Leaf(("layers", *path), names, transpose, True))
    return out


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every transformers tensor of a model with config `cfg` (their [out, in]
    layout), from the abstract model: no weights are made."""
    abstract = nnx.eval_shape(lambda: Llama(cfg, None, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, BASE_FILTER)
    out = {}
    for leaf in hf_layout(cfg):
        shape = tuple(_get(state, leaf.path).shape)
        one = shape[1:] if leaf.stacked else shape
        out.update(dict.fromkeys(leaf.names, one[::-1] if leaf.transpose else one))
    return out


def _get(state: nnx.State, path: tuple):
    node = state
    for key in path:
        node = node[key]
    return node


def _listed(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _layer_count(names) -> int:
    """1 + the highest layer index among transformers names (0 when none is a layer tensor)."""
    found = [int(m.group(1)) for n in names if (m := _LAYER.match(n))]
    return max(found) + 1 if found else 0


def _equal(tensors: Mapping[str, np.ndarray], a: str, b: str) -> bool:
    """Whether tensors `a` and `b` are equal; read in blocks of rows when `tensors` can read
    blocks (`loading.SafetensorsTensors`), so two embedding-sized tensors are never whole in
    host memory."""
    if not (hasattr(tensors, "read") and hasattr(tensors, "shape")):
        return np.array_equal(np.asarray(tensors[a]), np.asarray(tensors[b]))
    shape = tensors.shape(a)
    if shape != tensors.shape(b):
        return False
    rows = max(1, (1 << 24) // max(1, int(np.prod(shape[1:]))))  # ~16M elements per block
    for start in range(0, shape[0] if shape else 1, rows):
        index = (slice(start, min(start + rows, shape[0])),) if shape else ()
        if not np.array_equal(tensors.read(a, index), tensors.read(b, index)):
            return False
    return True


def check_tensor_names(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], *,
                       source: str = "") -> None:
    """G2ISError unless `tensors` holds exactly the tensors a model with config `cfg` uses.

    Ignored: rotary-table buffers some exporters save, and a tied checkpoint's redundant
    ``lm_head.weight`` when it equals the embedding. The message names the first few missing
    or unused tensors, their count, and the config field to fix when the layer counts differ.
    """
    where = f" in {source}" if source else ""
    wanted = [n for leaf in hf_layout(cfg) for n in leaf.names]
    known = set(wanted)
    missing = [n for n in wanted if n not in tensors]
    unused = sorted(n for n in tensors if n not in known and not _IGNORED.match(n))
    if cfg.tie_word_embeddings and "lm_head.weight" in unused and \
            "model.embed_tokens.weight" in tensors and \
            _equal(tensors, "lm_head.weight", "model.embed_tokens.weight"):
        unused.remove("lm_head.weight")
    if not missing and not unused:
        return
    layers = _layer_count(tensors)
    if layers and layers != cfg.num_layers:
        fix = (f"the weights hold {layers} layers but the config says {cfg.num_layers} "
               f"(num_hidden_layers in config.json, block_count in GGUF metadata): fix the "
               f"config, or use the weights it was written for")
    elif unused == ["lm_head.weight"]:
        fix = ("the config ties the LM head to the embedding but the checkpoint has its own "
               "lm_head.weight: set tie_word_embeddings to false in the config")
    elif not unused:
        fix = ("the checkpoint is incomplete (download or convert it again) or its config "
               "describes another model")
    else:
        fix = ("config and weights describe different models: fix the config (layers, "
               "tie_word_embeddings, attention_bias, model_type) or use the matching checkpoint")
    parts = []
    if missing:
        parts.append(f"lacks tensor{'s' if len(missing) > 1 else ''} {_listed(missing)}"
                     f"{f' ({len(missing)} missing)' if len(missing) > 1 else ''}")
    if unused:
        parts.append(f"has {len(unused)} tensor{'s' if len(unused) > 1 else ''} the config "
                     f"does not use: {_listed(unused)}")
    raise G2ISError(f"checkpoint{where} {' and '.join(parts)}; {fix}")


def load_hf_tensors(model: Llama, tensors: Mapping[str, np.ndarray], *, source: str = "") -> None:
    """Fill `model`'s base weights (in place) from transformers-named arrays.

    Each leaf is assembled on the host in its final (stacked, transposed, cast) layout and then
    placed once, so peak memory is the model plus one leaf. Raises G2ISError naming the
    tensors when any is missing, unused (`check_tensor_names`) or of the wrong shape.
    """
    cfg = model.config
    check_tensor_names(cfg, tensors, source=source)
    state = nnx.state(model, BASE_FILTER)
    where = f" in {source}" if source else ""
    for leaf in hf_layout(cfg):
        var = _get(state, leaf.path)
        shape, dtype = tuple(var[...].shape), var[...].dtype
        want = shape[1:] if leaf.stacked else shape
        buf = np.empty(shape, dtype)
        for i, name in enumerate(leaf.names):
            raw = np.asarray(tensors[name])
            arr = raw.T if leaf.transpose else raw
            if tuple(arr.shape) != want:
                raise G2ISError(f"tensor {name!r}{where} has shape {tuple(raw.shape)}, the "
                                f"config expects {want[::-1] if leaf.transpose else want}")
            if leaf.stacked:
                buf[i] = arr
            else:
                buf[...] = arr
        var[...] = jnp.asarray(buf)
    nnx.update(model, state)


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The base weights under transformers' names and layouts (float32 NumPy)."""
    state = nnx.state(model, BASE_FILTER)
    out = {}
    for leaf in hf_layout(model.config):
        arr = np.asarray(_get(state, leaf.path)[...], dtype=np.float32)
        for i, name in enumerate(leaf.names):
            one = arr[i] if leaf.stacked else arr
            out[name] = np.ascontiguousarray(one.T) if leaf.transpose else one
    return out
