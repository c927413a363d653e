"""Name and layout mapping between our parameter tree and transformers' state dict.

transformers stores a linear layer's weight as [out, in]; ours is a kernel [in, out]. Everything
else is a rename. The same table serves checkpoint loading (HF safetensors, GGUF after its own
renaming) and export (for the PyTorch reference models in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import ModelConfig
from g2is_jax.models.llama import BASE_FILTER, Llama

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def hf_name_map(cfg: ModelConfig) -> dict[str, tuple[tuple, bool]]:
    """transformers tensor name -> (our state path, transpose?) for the base weights."""
    out: dict[str, tuple[tuple, bool]] = {
        "model.embed_tokens.weight": (("embed_tokens", "embedding"), False),
        "model.norm.weight": (("norm", "scale"), False),
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (("lm_head", "kernel"), True)
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}"
        out[f"{pre}.input_layernorm.weight"] = (("layers", i, "input_layernorm", "scale"), False)
        out[f"{pre}.post_attention_layernorm.weight"] = (
            ("layers", i, "post_attention_layernorm", "scale"), False)
        for p in _ATTN:
            out[f"{pre}.self_attn.{p}.weight"] = (("layers", i, "self_attn", p, "kernel"), True)
            if cfg.attention_bias and p != "o_proj":
                out[f"{pre}.self_attn.{p}.bias"] = (("layers", i, "self_attn", p, "bias"), False)
        for p in _MLP:
            out[f"{pre}.mlp.{p}.weight"] = (("layers", i, "mlp", p, "kernel"), True)
    return out


def _get(state: nnx.State, path: tuple):
    node = state
    for key in path:
        node = node[key]
    return node


def load_hf_tensors(model: Llama, tensors: Mapping[str, np.ndarray], *, source: str = "") -> None:
    """Fill `model`'s base weights (in place) from transformers-named arrays.

    Raises G2ISError naming the tensor when one is missing or has the wrong shape; extra
    tensors that no layer uses (rotary caches, ...) are ignored.
    """
    cfg = model.config
    state = nnx.state(model, BASE_FILTER)
    where = f" in {source}" if source else ""
    for name, (path, transpose) in hf_name_map(cfg).items():
        if name not in tensors:
            raise G2ISError(f"checkpoint{where} lacks tensor {name!r}")
        arr = np.asarray(tensors[name])
        if transpose:
            arr = arr.T
        var = _get(state, path)
        if tuple(arr.shape) != tuple(var[...].shape):
            raise G2ISError(
                f"tensor {name!r}{where} has shape {tuple(np.asarray(tensors[name]).shape)}, "
                f"the config expects {tuple(var[...].shape[::-1] if transpose else var[...].shape)}"
            )
        var[...] = jnp.asarray(arr, dtype=var[...].dtype)
    nnx.update(model, state)


def hf_tensors(model: Llama) -> dict[str, np.ndarray]:
    """The base weights under transformers' names and layouts (float32 NumPy)."""
    state = nnx.state(model, BASE_FILTER)
    out = {}
    for name, (path, transpose) in hf_name_map(model.config).items():
        arr = np.asarray(_get(state, path)[...], dtype=np.float32)
        out[name] = arr.T.copy() if transpose else arr
    return out
