"""Frozen configs for the decoder and its LoRA adapters.

`ModelConfig` covers the decoder families as transformers describes them: Llama 2/3 (and
SmolLM2), Mistral (sliding-window attention), Qwen2 (q/k/v bias, optional sliding layers), Gemma
(GeGLU, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), head_dim independent of hidden/heads,
tied embeddings) and Gemma 2 (Gemma plus attention- and final-logit soft-capping, alternating
sliding-window and global layers, extra norms around attention and feed-forward, and
``query_pre_attn_scalar``). It is built from a Hugging Face `config.json` dict (`from_hf`, with
transformers' defaults for absent keys) or from GGUF metadata by the loader, and can be written
back (`to_hf`) so a PyTorch reference model can be built from it.

Family traits that transformers hard-codes per model type (the Gemma norm, embedding scale and
extra norms) are properties of ``model_type``; everything a config.json sets is a field. Which
layers use the sliding window is per-layer data (`layer_windows`), so one scanned layer body
serves every layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from g2is_jax.errors import G2ISError

LORA_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
# model_type -> transformers architecture
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM"}
_TYPE_OF_ARCH = {arch: mtype for mtype, arch in ARCHITECTURES.items()}
GEMMA_TYPES = ("gemma", "gemma2")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")  # gelu_tanh: GELU's tanh approximation
# transformers' activation names -> ours
_HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_new": "gelu_tanh", "gelu": "gelu"}
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: "linear" (divide all frequencies) or "llama3" (Llama 3.1 bands)."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise G2ISError(
                f"rope scaling {self.kind!r} is not supported (supported: linear, llama3)"
            )
        if self.factor <= 0:
            raise G2ISError(f"rope scaling factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q, k, v (and o, except Qwen2)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    hidden_act: str = "silu"  # the gate's activation, one of ACTIVATIONS
    # Keys visible to a query at slot i on a sliding layer: slots i - sliding_window + 1 .. i.
    sliding_window: int | None = None
    # Per layer FULL or SLIDING (None with a window: every layer slides, Gemma 2: even layers).
    layer_types: tuple[str, ...] | None = None
    query_pre_attn_scalar: int | None = None  # Gemma 2: scores scaled by this ** -0.5
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: the same on the output logits

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise G2ISError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "head_dim"):
            if getattr(self, name) <= 0:
                raise G2ISError(f"model config: {name} must be > 0")
        if self.model_type not in ARCHITECTURES:
            raise G2ISError(f"model config: model_type {self.model_type!r} is not supported; "
                            f"choose from {sorted(ARCHITECTURES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise G2ISError(f"model config: hidden_act {self.hidden_act!r} is not supported; "
                            f"choose from {list(ACTIVATIONS)}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (self.model_type != "gemma2" or value <= 0):
                raise G2ISError(f"model config: {name} must be None or > 0, and is a Gemma 2 "
                                f"setting (model_type {self.model_type!r})")
        self._check_windows()

    def _check_windows(self) -> None:
        window, types = self.sliding_window, self.layer_types
        if window is None:
            if types is not None and SLIDING in types:
                raise G2ISError("model config: layer_types names sliding layers but "
                                "sliding_window is None")
            object.__setattr__(self, "layer_types", None)
            return
        if self.model_type in ("llama", "gemma"):
            raise G2ISError(f"model config: {self.model_type} has no sliding-window attention; "
                            f"set sliding_window to None")
        if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
            raise G2ISError(f"model config: sliding_window must be a positive integer, got "
                            f"{window!r}")
        if types is None:
            types = tuple(SLIDING if self.model_type != "gemma2" or i % 2 == 0 else FULL
                          for i in range(self.num_layers))
        types = tuple(types)
        if len(types) != self.num_layers or any(t not in (FULL, SLIDING) for t in types):
            raise G2ISError(f"model config: layer_types must list {self.num_layers} entries "
                            f"of {FULL!r} or {SLIDING!r}, got {list(types)}")
        if self.model_type == "mistral" and FULL in types:
            raise G2ISError("model config: Mistral applies its sliding window to every layer; "
                            "layer_types must all be 'sliding_attention'")
        if SLIDING not in types:  # no layer slides: the same model as no window at all
            window, types = None, None
        object.__setattr__(self, "sliding_window", window)
        object.__setattr__(self, "layer_types", types)

    # Family traits transformers hard-codes per model type.
    @property
    def gemma_norm(self) -> bool:
        """RMSNorm scales by (1 + w), in float32 before the cast (Gemma)."""
        return self.model_type in GEMMA_TYPES

    @property
    def embed_scale(self) -> float | None:
        """Embeddings multiplied by sqrt(hidden_size) (Gemma), else None."""
        return float(np.sqrt(self.hidden_size)) if self.model_type in GEMMA_TYPES else None

    @property
    def sandwich_norms(self) -> bool:
        """Norms after attention and around the MLP as well (Gemma 2)."""
        return self.model_type == "gemma2"

    @property
    def o_proj_bias(self) -> bool:
        """A bias on the output projection: with attention_bias, except Qwen2 (q, k, v only)."""
        return self.attention_bias and self.model_type != "qwen2"

    def layer_windows(self) -> tuple[int, ...] | None:
        """Per layer, the sliding window (0 on a full-attention layer); None when no layer
        slides. The scanned layer body reads its entry as data."""
        if self.sliding_window is None:
            return None
        return tuple(self.sliding_window if t == SLIDING else 0 for t in self.layer_types)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """From a transformers `config.json` dict of a Llama, Mistral, Qwen2, Gemma or Gemma 2
        model; absent keys take transformers' defaults for that model type."""
        archs = set(hf.get("architectures") or [])
        mtype = hf.get("model_type")
        if mtype is None:
            known = sorted(_TYPE_OF_ARCH[a] for a in archs if a in _TYPE_OF_ARCH)
            mtype = known[0] if known else "llama"
        if mtype not in ARCHITECTURES:
            raise G2ISError(
                f"model_type {mtype!r} (architectures {sorted(archs)}) is not supported; "
                f"supported: {sorted(ARCHITECTURES)}"
            )
        if hf.get("mlp_bias"):
            raise G2ISError("mlp_bias = true (a bias on the MLP projections) is not supported")
        scaling = None
        rs = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rs:
            kind = rs.get("rope_type", rs.get("type", "default"))
            if kind == "llama3":
                scaling = RopeScaling(
                    "llama3",
                    float(rs["factor"]),
                    float(rs.get("low_freq_factor", 1.0)),
                    float(rs.get("high_freq_factor", 4.0)),
                    int(rs.get("original_max_position_embeddings", 8192)),
                )
            elif kind == "linear":
                scaling = RopeScaling("linear", float(rs["factor"]))
            elif kind != "default":
                raise G2ISError(f"rope scaling type {kind!r} is not supported")
        theta = hf.get("rope_theta")
        if theta is None and isinstance(rs, Mapping):
            theta = rs.get("rope_theta")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0]
        gemma2 = mtype == "gemma2"

        def gemma2_value(key: str, default: float, kind: type = float) -> Any:
            value = hf.get(key, default) if gemma2 else None
            return None if value is None else kind(value)

        window, types = _hf_windows(hf, mtype)
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            rope_scaling=scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", mtype in GEMMA_TYPES)),
            attention_bias=mtype != "mistral" and bool(hf.get("attention_bias",
                                                              mtype == "qwen2")),
            model_type=mtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
            hidden_act=_hf_activation(hf, mtype),
            sliding_window=window,
            layer_types=types,
            query_pre_attn_scalar=gemma2_value("query_pre_attn_scalar", 256, int),
            attn_logit_softcapping=gemma2_value("attn_logit_softcapping", 50.0),
            final_logit_softcapping=gemma2_value("final_logit_softcapping", 30.0),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict describing the same model."""
        out: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": _TO_HF_ACTIVATION[self.hidden_act],
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            sliding = self.layer_types is not None
            out["use_sliding_window"] = sliding
            if sliding:
                out["sliding_window"] = self.sliding_window
                out["max_window_layers"] = self.layer_types.index(SLIDING)
                out["layer_types"] = list(self.layer_types)
        elif self.model_type == "gemma2":
            out["hidden_activation"] = out["hidden_act"]
            out["sliding_window"] = self.sliding_window
            out["layer_types"] = list(self.layer_types or (FULL,) * self.num_layers)
            out["query_pre_attn_scalar"] = self.query_pre_attn_scalar
            out["attn_logit_softcapping"] = self.attn_logit_softcapping
            out["final_logit_softcapping"] = self.final_logit_softcapping
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            out["rope_scaling"] = (
                {"rope_type": "linear", "factor": rs.factor}
                if rs.kind == "linear"
                else {
                    "rope_type": "llama3",
                    "factor": rs.factor,
                    "low_freq_factor": rs.low_freq_factor,
                    "high_freq_factor": rs.high_freq_factor,
                    "original_max_position_embeddings": rs.original_max_position_embeddings,
                }
            )
        return out


_TO_HF_ACTIVATION = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _hf_activation(hf: Mapping[str, Any], mtype: str) -> str:
    """Our activation for a config.json, as transformers reads it for `mtype`."""
    if mtype == "gemma2":
        name = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    elif mtype == "gemma":
        name = hf.get("hidden_act") or "gelu_pytorch_tanh"
        # transformers maps Gemma's legacy "gelu" to the tanh approximation it was trained with
        name = "gelu_pytorch_tanh" if name == "gelu" else name
    else:
        name = hf.get("hidden_act") or "silu"
    if name not in _HF_ACTIVATIONS:
        raise G2ISError(f"hidden activation {name!r} is not supported; supported: "
                        f"{sorted(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[name]


def _hf_windows(hf: Mapping[str, Any], mtype: str) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) as transformers reads them for `mtype`."""
    n = int(hf["num_hidden_layers"])
    if mtype in ("llama", "gemma"):
        return None, None
    window = hf.get("sliding_window", 4096)
    if mtype == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, None
    types = hf.get("layer_types")
    if mtype == "mistral" or (types is None and mtype != "qwen2"):
        types = None  # every layer (Mistral), or Gemma 2's alternation (`_check_windows`)
    elif types is None:
        first = int(hf.get("max_window_layers", 28))
        types = [SLIDING if i >= first else FULL for i in range(n)]
    return int(window), None if types is None else tuple(types)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters on the named projections (LESS's default: q, k, v, o; r=128, alpha=512)."""

    rank: int = 128
    alpha: float = 512.0
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q", "k", "v", "o")

    def __post_init__(self):
        mods = tuple(m.removesuffix("_proj") for m in self.target_modules)
        object.__setattr__(self, "target_modules", mods)
        bad = [m for m in mods if m not in LORA_MODULES]
        if bad:
            raise G2ISError(
                f"unknown LoRA target module(s) {bad}; choose from {list(LORA_MODULES)}"
            )
        if not mods:
            raise G2ISError("LoRA needs at least one target module")
        if self.rank <= 0:
            raise G2ISError(f"LoRA rank must be > 0, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise G2ISError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


LORA_PRESETS = {
    "less": LoraConfig(),  # r=128, alpha=512, dropout 0.1, q,k,v,o
    "cpu-small": LoraConfig(rank=8, alpha=32.0, dropout=0.1),
    "tiny": LoraConfig(rank=4, alpha=16.0, dropout=0.0),
}
