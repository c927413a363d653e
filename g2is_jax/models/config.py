"""Frozen configs for the decoder and its LoRA adapters.

`ModelConfig` covers the Llama family as transformers describes it (Llama 2/3, Mistral, Qwen2,
SmolLM2): it is built from a Hugging Face `config.json` dict (`from_hf`) or from GGUF metadata by
the loader, and can be written back (`to_hf`) so a PyTorch reference model can be built from it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from g2is_jax.errors import G2ISError

LORA_MODULES = ("q", "k", "v", "o", "gate", "up", "down")
_SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
_SUPPORTED_TYPES = {"llama", "mistral", "qwen2"}


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
    attention_bias: bool = False  # Qwen2: bias on q, k, v (not o)
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise G2ISError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise G2ISError(f"model config: {name} must be > 0")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModelConfig:
        """From a transformers `config.json` dict of a Llama, Mistral or Qwen2 model."""
        archs = set(hf.get("architectures") or [])
        mtype = hf.get("model_type", "llama")
        if mtype not in _SUPPORTED_TYPES and not archs & _SUPPORTED_ARCHS:
            raise G2ISError(
                f"model_type {mtype!r} (architectures {sorted(archs)}) is not supported; "
                f"supported: {sorted(_SUPPORTED_TYPES)}"
            )
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
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", mtype == "qwen2")),
            model_type=mtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=eos,
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict describing the same model."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM"}[self.model_type]
        out: dict[str, Any] = {
            "architectures": [arch],
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
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
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
