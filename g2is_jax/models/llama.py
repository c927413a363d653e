"""A Flax NNX decoder for the Llama and Gemma families, with LoRA adapters as their own variable
type.

One module tree serves Llama 2/3 (incl. Llama 3 rope scaling), SmolLM2 (tied embeddings), Mistral
(sliding-window attention), Qwen2 (bias on q, k, v), Gemma (GeGLU, (1 + w) RMSNorm, scaled
embeddings) and Gemma 2 (soft-capped attention and output logits, alternating sliding-window
layers, norms around attention and MLP outputs); `ModelConfig` says which. Parameter names
follow transformers' (``layers.self_attn.q_proj.kernel`` ...) so checkpoint and PEFT mapping is
a rename plus a transpose. LoRA factors are `nnx.LoRAParam`s (``lora_a``: in×r, ``lora_b``:
r×out, B starts at zero) next to the frozen ``kernel``; `g2is_jax.models.lora.split_lora`
separates them so gradients are taken with respect to the adapters only.

Layers are stored stacked, as in the Flax NNX scan-over-layers guide: ``model.layers`` is one
`DecoderLayer` whose every parameter has a leading layer axis (``layers.self_attn.q_proj.kernel``
is [L, in, out], LoRA's ``lora_a`` [L, in, r]), stacked once at construction and run with
`lax.scan`. Layer i of transformers' ``model.layers.{i}.*`` is index i of that axis. Anything
that walks the parameter tree sees one leaf per kind of weight, not one per layer. What differs
between layers (Gemma 2's sliding vs. global layers) enters the scan as per-layer data
(`ModelConfig.layer_windows`), never as a Python branch per layer.

Conventions: right padding for training and scoring (positions 0..L-1), any padding for
generation when positions are passed explicitly; softmax and logits in float32; masked scores use
the dtype's most negative finite value, so a row with no visible key gives no NaN. Dropout is
driven by an explicit key (``dropout_key``) instead of stateful RNG streams, which keeps every
call a pure function of its inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig, RopeScaling

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
LAYERS = "layers"  # the model attribute (and state key) whose leaves have a leading layer axis


def resolve_dtype(dtype: str | jnp.dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise G2ISError(f"dtype {dtype!r} is not supported; choose from {list(_DTYPES)}")
        return _DTYPES[dtype]
    return jnp.dtype(dtype)


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class KVCache(NamedTuple):
    """Keys/values of all layers, [layers, B, S, kv_heads, head_dim], and which of the S slots
    hold a real token ([B, S] int32)."""

    keys: jax.Array
    values: jax.Array
    mask: jax.Array

    @staticmethod
    def zeros(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
        shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                       jnp.zeros((batch, length), jnp.int32))


class LoRALinear(nnx.Module):
    """y = x W (+ b) + dropout(x) A B · alpha/r, with W frozen and A, B as `nnx.LoRAParam`."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool,
                 lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None
        self.dtype = dtype
        if lora is not None:
            # A as PEFT's default (Kaiming-uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
            bound = 1.0 / np.sqrt(in_features)
            self.lora_a = nnx.LoRAParam(jax.random.uniform(
                rngs.params(), (in_features, lora.rank), jnp.float32, -bound, bound))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora.rank, out_features), jnp.float32))
            self.lora_scaling = float(lora.scaling)
            self.lora_dropout = float(lora.dropout)
        else:
            self.lora_a = None
            self.lora_b = None

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))
        if self.lora_a is not None:
            h = x
            if dropout_key is not None and self.lora_dropout > 0.0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, h.shape)
                h = jnp.where(keep, h / (1.0 - self.lora_dropout), 0).astype(h.dtype)
            a = self.lora_a[...].astype(self.dtype)
            b = self.lora_b[...].astype(self.dtype)
            y = y + (h @ a @ b) * jnp.asarray(self.lora_scaling, self.dtype)
        return y


class RMSNorm(nnx.Module):
    """x / rms(x) * w (Llama: cast to x's dtype, then scaled), or with ``plus_one`` (Gemma)
    x / rms(x) * (1 + w), scaled in float32 and then cast; w starts at the identity."""

    def __init__(self, dim: int, eps: float, dtype, plus_one: bool = False):
        self.scale = nnx.Param((jnp.zeros if plus_one else jnp.ones)((dim,), dtype))
        self.eps = eps
        self.plus_one = plus_one

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        w = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        if self.plus_one:
            return (x32 * jax.lax.rsqrt(var + self.eps) * (1.0 + w.astype(jnp.float32))
                    ).astype(x.dtype)
        normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
        return normed * w


def _norm(cfg: ModelConfig, dtype) -> RMSNorm:
    return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, plus_one=cfg.gemma_norm)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Inverse frequencies [head_dim/2], with linear or Llama-3 band scaling applied."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    # Llama 3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    low_wl = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wl = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wl = 2 * np.pi / inv
    smooth = (scaling.original_max_position_embeddings / wl - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    out = np.where(wl > low_wl, inv / scaling.factor, np.where(wl < high_wl, inv, blended))
    return out.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (transformers' layout) on x [B, L, H, D] at positions [B, L]."""
    ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)[None, None]
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        def lora_for(name):
            return lora if lora is not None and name in lora.target_modules else None

        h, d, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        bias = cfg.attention_bias
        self.q_proj = LoRALinear(h, nh * d, use_bias=bias, lora=lora_for("q"), dtype=dtype,
                                 rngs=rngs)
        self.k_proj = LoRALinear(h, nkv * d, use_bias=bias, lora=lora_for("k"), dtype=dtype,
                                 rngs=rngs)
        self.v_proj = LoRALinear(h, nkv * d, use_bias=bias, lora=lora_for("v"), dtype=dtype,
                                 rngs=rngs)
        self.o_proj = LoRALinear(nh * d, h, use_bias=cfg.o_proj_bias, lora=lora_for("o"),
                                 dtype=dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = nh, nkv, d
        # Scores are divided by sqrt(this): head_dim, or Gemma 2's query_pre_attn_scalar.
        self.score_divisor = float(cfg.query_pre_attn_scalar or d)
        self.softcap = cfg.attn_logit_softcapping
        # Static (hashable) so the RoPE table is a compile-time constant, not model state.
        self.rope = (d, float(cfg.rope_theta), cfg.rope_scaling)

    def __call__(self, x, positions, key_mask, query_slots, key_slots, dropout_key,
                 cache_kv=None, cache_index=None, window=None):
        """`window`: this layer's sliding window as a traced int32 scalar (0: attend to every
        earlier slot), or None when no layer of the model slides."""
        b, length, _ = x.shape
        q = self.q_proj(x, _fold(dropout_key, 0)).reshape(b, length, self.num_heads, -1)
        k = self.k_proj(x, _fold(dropout_key, 1)).reshape(b, length, self.num_kv_heads, -1)
        v = self.v_proj(x, _fold(dropout_key, 2)).reshape(b, length, self.num_kv_heads, -1)
        inv_freq = rope_inv_freq(*self.rope)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, cache_index, 0, 0))
            new_kv = (k, v)
        groups = self.num_heads // self.num_kv_heads
        qg = q.reshape(b, length, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum("blkgd,bskd->bkgls", qg, k.astype(q.dtype),
                            preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(self.score_divisor).astype(np.float32)
        if self.softcap is not None:
            scores = jnp.tanh(scores / self.softcap) * self.softcap
        causal = key_slots[None, :] <= query_slots[:, None]
        if window is not None:
            # Sliding window (transformers' rule): key slot j is visible from query slot i
            # when i - j < window; window 0 marks a full-attention layer.
            near = query_slots[:, None] - key_slots[None, :] < window
            causal = causal & ((window <= 0) | near)
        visible = causal[None] & (key_mask[:, None, :] > 0)
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgls,bskd->blkgd", probs, v).reshape(b, length, -1)
        return self.o_proj(out.astype(x.dtype), _fold(dropout_key, 3)), new_kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        def lora_for(name):
            return lora if lora is not None and name in lora.target_modules else None

        h, m = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = LoRALinear(h, m, use_bias=False, lora=lora_for("gate"), dtype=dtype,
                                    rngs=rngs)
        self.up_proj = LoRALinear(h, m, use_bias=False, lora=lora_for("up"), dtype=dtype,
                                  rngs=rngs)
        self.down_proj = LoRALinear(m, h, use_bias=False, lora=lora_for("down"), dtype=dtype,
                                    rngs=rngs)
        self.act = cfg.hidden_act  # SwiGLU (silu) or GeGLU (gelu_tanh, gelu)

    def __call__(self, x, dropout_key):
        g = self.gate_proj(x, _fold(dropout_key, 4))
        u = self.up_proj(x, _fold(dropout_key, 5))
        return self.down_proj(_ACTIVATIONS[self.act](g) * u, _fold(dropout_key, 6))


class DecoderLayer(nnx.Module):
    """One decoder block. `Llama` holds a single instance whose parameters carry a leading layer
    axis (see `stacked_layers`) and runs it under `lax.scan`, one layer slice per step."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs):
        self.input_layernorm = _norm(cfg, dtype)
        self.self_attn = Attention(cfg, lora, dtype, rngs)
        self.post_attention_layernorm = _norm(cfg, dtype)
        # Gemma 2: post_attention_layernorm normalises the attention output, and the MLP gets a
        # norm on each side.
        self.sandwich = cfg.sandwich_norms
        self.pre_feedforward_layernorm = _norm(cfg, dtype) if self.sandwich else None
        self.post_feedforward_layernorm = _norm(cfg, dtype) if self.sandwich else None
        self.mlp = MLP(cfg, lora, dtype, rngs)

    def __call__(self, x, positions, key_mask, query_slots, key_slots, dropout_key,
                 cache_kv=None, cache_index=None, window=None):
        attn, new_kv = self.self_attn(self.input_layernorm(x), positions, key_mask, query_slots,
                                      key_slots, dropout_key, cache_kv, cache_index, window)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            h = self.mlp(self.pre_feedforward_layernorm(x), dropout_key)
            return x + self.post_feedforward_layernorm(h), new_kv
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x), dropout_key)
        return x, new_kv


def stacked_layers(cfg: ModelConfig, lora: LoraConfig | None, dtype, rngs: nnx.Rngs
                   ) -> DecoderLayer:
    """`cfg.num_layers` decoder layers as ONE `DecoderLayer` whose every parameter (LoRA factors
    included) has a leading layer axis: ``kernel`` [L, in, out], ``scale`` [L, H], ``lora_a``
    [L, in, r].

    The layers are initialised one after the other from `rngs` (layer i draws what it would as
    the i-th of a list of layers) and stacked once, here, at construction. Concrete arrays are
    stacked on the host, which costs no XLA compilation; under `nnx.eval_shape` (`build_model`)
    or a jit the stacking is abstract and free.
    """
    layers = [DecoderLayer(cfg, lora, dtype, rngs) for _ in range(cfg.num_layers)]
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.state(layer) for layer in layers]
    return nnx.merge(graphdef, jax.tree.map(_stack, *states))


def _stack(*xs: jax.Array) -> jax.Array:
    if any(isinstance(x, jax.core.Tracer) for x in xs):
        return jnp.stack(xs)
    return jnp.asarray(np.stack([np.asarray(x) for x in xs]))


class Llama(nnx.Module):
    """The decoder. `__call__` returns float32 logits [B, L, V] (and the updated cache).

    Layout: ``embed_tokens``, ``layers`` (one `DecoderLayer` holding all layers' weights on a
    leading layer axis, `stacked_layers`), ``norm`` and ``lm_head`` (None when tied). The forward
    scans over ``layers`` directly: no per-call stacking, so a compiled forward holds one copy of
    the weights plus at most one layer slice.
    """

    def __init__(self, config: ModelConfig, lora: LoraConfig | None = None, *,
                 dtype: str = "float32", rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        dt = resolve_dtype(dtype)
        self.config = config
        self.lora_config = lora
        self.dtype_name = jnp.dtype(dt).name
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dt,
                                      param_dtype=dt, rngs=rngs)
        self.layers = stacked_layers(config, lora, dt, rngs)  # attribute name == LAYERS
        self.norm = _norm(config, dt)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = LoRALinear(config.hidden_size, config.vocab_size, use_bias=False,
                                      lora=None, dtype=dt, rngs=rngs)

    def hidden_states(self, input_ids, attention_mask=None, *, positions=None,
                      dropout_key=None, cache: KVCache | None = None, cache_index=0):
        """The final normed hidden states [B, L, H] (and the updated cache, or None)."""
        b, length = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((b, length), jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        query_slots = jnp.arange(length, dtype=jnp.int32)
        if cache is not None:
            query_slots = query_slots + cache_index
            key_mask = jax.lax.dynamic_update_slice(
                cache.mask, attention_mask.astype(jnp.int32), (0, cache_index))
            key_slots = jnp.arange(cache.mask.shape[1], dtype=jnp.int32)
        else:
            key_mask, key_slots = attention_mask, query_slots
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the dtype
            x = x * jnp.asarray(self.config.embed_scale, x.dtype)
        # One layer body under lax.scan over the stored stacked weights: the program holds one
        # layer, not num_layers copies (compile time independent of depth), and each step reads
        # its slice of the weights in place.
        layer_def, stacked = nnx.split(self.layers)
        kv = None if cache is None else (cache.keys, cache.values)
        windows = self.config.layer_windows()  # per-layer data, not a branch per layer
        windows = None if windows is None else jnp.asarray(windows, jnp.int32)

        def body(h, xs):
            state, layer_kv, i, window = xs
            layer = nnx.merge(layer_def, state)
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            h, new_kv = layer(h, positions, key_mask, query_slots, key_slots, key, layer_kv,
                              cache_index, window)
            return h, new_kv

        layer_index = jnp.arange(self.config.num_layers, dtype=jnp.int32)
        x, new_kv = jax.lax.scan(body, x, (stacked, kv, layer_index, windows))
        x = self.norm(x)
        new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], key_mask)
        return x, new_cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [B, L, V] of final hidden states [B, L, H] (soft-capped for Gemma 2)."""
        if self.lm_head is None:
            out = jnp.einsum("blh,vh->blv", hidden, self.embed_tokens.embedding[...],
                             preferred_element_type=jnp.float32)
        else:
            # float32 out of the dot (not a bfloat16 product cast afterwards: logits of 10-30
            # would be rounded by ~0.1 before the log-softmax)
            out = jnp.matmul(hidden, self.lm_head.kernel[...],
                             preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return out if cap is None else jnp.tanh(out / cap) * cap

    def __call__(self, input_ids, attention_mask=None, *, positions=None, dropout_key=None,
                 cache: KVCache | None = None, cache_index=0):
        hidden, new_cache = self.hidden_states(
            input_ids, attention_mask, positions=positions, dropout_key=dropout_key,
            cache=cache, cache_index=cache_index)
        logits = self.logits(hidden)
        return logits if cache is None else (logits, new_cache)


def example_nll(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean token cross-entropy over the masked targets of one or more rows.

    logits[..., t, :] predicts input_ids[..., t+1]; `loss_mask[t]` marks input_ids[t] as a target.
    Returns one value per row (0 for a row with no target).
    """
    logp = jax.nn.log_softmax(logits[..., :-1, :].astype(jnp.float32), axis=-1)
    targets = input_ids[..., 1:]
    tok = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    m = loss_mask[..., 1:].astype(jnp.float32)
    return jnp.sum(tok * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def target_hidden(hidden: jax.Array, target_index: jax.Array) -> jax.Array:
    """The hidden states [B, K, H] that predict the tokens at `target_index` [B, K]: those at
    positions target_index - 1 (position 0 for an empty slot, whose index is 0)."""
    source = jnp.maximum(target_index - 1, 0)
    return jnp.take_along_axis(hidden, source[..., None], axis=-2)


def target_nll(logits: jax.Array, input_ids: jax.Array, target_index: jax.Array,
               target_mask: jax.Array) -> jax.Array:
    """`example_nll` from the logits at the loss positions only.

    logits[..., k, :] predicts input_ids[..., target_index[k]] (they come from the hidden state
    at target_index[k] - 1, see `target_hidden`); `target_mask[k]` weighs that term (0 for an
    empty slot). Returns one value per row (0 for a row with no target), equal to `example_nll`
    of the full logits when the slots list every position t >= 1 of the loss mask.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    labels = jnp.take_along_axis(input_ids, target_index, axis=-1)
    tok = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    m = target_mask.astype(jnp.float32)
    return jnp.sum(tok * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)


def init_model(config: ModelConfig, lora: LoraConfig | None = None, *, seed: int = 0,
               dtype: str = "float32") -> Llama:
    """A randomly initialised model (weights N(0, 0.02), LoRA B = 0)."""
    return Llama(config, lora, dtype=dtype, rngs=nnx.Rngs(seed))


BASE_FILTER = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def init_lora_state(abstract: nnx.State, seed: int) -> nnx.State:
    """Fresh adapters for an abstract LoRA state: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's
    default), B = 0, float32. A function of (shapes, seed) only."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    values = []
    for key, (path, leaf) in zip(keys, leaves):
        if any(getattr(p, "key", None) == "lora_a" for p in path):
            bound = 1.0 / np.sqrt(leaf.shape[-2])  # [..., in, r]: stacked or not
            values.append(jax.random.uniform(key, leaf.shape, jnp.float32, -bound, bound))
        else:
            values.append(jnp.zeros(leaf.shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, values)


def build_model(config: ModelConfig, lora: LoraConfig | None = None, *, dtype: str = "float32",
                seed: int = 0, base: nnx.State | None = None) -> Llama:
    """A `Llama` with base weights `base` (zeros when None, for a loader to fill) and fresh
    adapters from `seed` (`init_lora_state`).

    The model is traced abstractly (`nnx.eval_shape`): the base is never randomly initialised,
    so an 8B model costs no random draws and no extra copy.
    """
    abstract = nnx.eval_shape(lambda: Llama(config, lora, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, base_abs, lora_abs = nnx.split(abstract, BASE_FILTER, nnx.LoRAParam)
    if base is None:
        base = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), base_abs)
    return nnx.merge(graphdef, base, init_lora_state(lora_abs, seed), copy=True)


def with_lora(model: Llama, lora: LoraConfig, *, seed: int = 0) -> Llama:
    """A new model with the base weights of `model` and fresh LoRA adapters (B = 0)."""
    return build_model(model.config, lora, dtype=model.dtype_name, seed=seed,
                       base=nnx.state(model, BASE_FILTER))


__all__ = [
    "BASE_FILTER",
    "KVCache",
    "LAYERS",
    "Llama",
    "LoRALinear",
    "LoraConfig",
    "ModelConfig",
    "apply_rope",
    "build_model",
    "example_nll",
    "init_lora_state",
    "init_model",
    "rope_inv_freq",
    "stacked_layers",
    "target_hidden",
    "target_nll",
    "with_lora",
]
