"""llama.cpp GGUF checkpoints: config, dequantized weights and tokenizer, from the file alone.

A GGUF file carries everything a transformers checkpoint directory does, under llama.cpp's names:

* **Config** from the metadata (``{arch}.block_count``, ``{arch}.embedding_length``, ...).
  Embeddings are tied when the file has no ``output.weight``; Llama 3.1 rope scaling, which
  llama.cpp stores as a ``rope_freqs`` tensor of per-frequency factors, is recognised by
  matching those factors.
* **Weights** are memory-mapped through the header's tensor table (`open_gguf`) and dequantized
  with `gguf.quants.dequantize`, which returns a row-major array in PyTorch's ``[out, in]``
  layout (GGUF *records* dimensions innermost first, ``[in, out]``). Names are mapped to
  transformers' (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``) so that
  `convert.load_hf_tensors` does the rest. `GGUFTensors` dequantizes lazily, one tensor at a
  time, so peak memory stays at one float32 tensor beyond the model.
* **Header**: parsed here (`open_gguf`, a few dozen lines) rather than with `gguf.GGUFReader`,
  which builds a NumPy view per metadata element and spends 3-10 s on SmolLM2's 49k-token
  vocabulary; the tests check that both read the same metadata, shapes, types and bytes.
* **Q/K rows**: llama.cpp's converter permutes the rows of every Llama q_proj/k_proj (weight and
  bias) so that its interleaved ("GPT-J") RoPE sees each head's two rotary halves as adjacent pairs:
  per head, row ``2*i + j`` of the file is row ``j*head_dim/2 + i`` of the original. Our RoPE is
  transformers' rotate-half, so `unpermute_qk` inverts that exactly (q uses ``head_count``, k uses
  ``head_count_kv``). Qwen2 files are not permuted (llama.cpp runs Qwen2 with NeoX RoPE).
* **Tokenizer** rebuilt with the `tokenizers` library from ``tokenizer.ggml.*``: byte-level BPE over
  the stored tokens and merges, the pre-tokenizer that ``tokenizer.ggml.pre`` names (for SmolLM2's
  ``"smollm"``: single digits split off first, then GPT-2's byte-level regex, exactly as SmolLM2's
  own tokenizer.json does), control tokens (type 3) as special added tokens, user-defined tokens
  (type 4) as added tokens, BOS/EOS insertion per ``add_bos_token``/``add_eos_token``, and the
  chat template from ``tokenizer.chat_template``.

Only the byte-level ("gpt2") tokenizer model and the ``llama``/``qwen2`` architectures are
supported; anything else is refused with a `G2ISError` that names the file and points to the
Hugging Face checkpoint directory as the alternative.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import ModelConfig, RopeScaling
from g2is_jax.models.llama import rope_inv_freq

__all__ = [
    "GGUFFile",
    "GGUFTensors",
    "TensorInfo",
    "gguf_config",
    "gguf_tokenizer",
    "open_gguf",
    "unpermute_qk",
]

_ARCHS = {"llama": "llama", "qwen2": "qwen2"}  # GGUF general.architecture -> our model_type
_PERMUTED_ARCHS = {"llama"}

_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors that carry no weights of ours: rotary tables (used for the config, or recomputed).
_IGNORED = {"rope_freqs.weight"}
_ROPE_FREQS_PRESETS = (  # Llama 3.1 and Llama 3.2 rope scaling, as llama.cpp bakes it into factors
    RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
)

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


# ------------------------------------------------------------------------------------------------
# Reading

# GGUF metadata value types (gguf.GGUFValueType) of fixed size, as struct/NumPy format codes.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file. `shape` is NumPy/PyTorch order ([out, in])."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header (metadata and tensor table) over a memory map of the file."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data: np.ndarray  # uint8 view of the whole file

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor `name`, shaped [..., bytes per row] for dequantize."""
        t = self.tensors[name]
        rows = t.shape[:-1]
        flat = self.data[t.offset:t.offset + t.n_bytes]
        return flat.reshape(*rows, t.n_bytes // max(int(np.prod(rows, dtype=np.int64)), 1))


class _Cursor:
    """Sequential little-endian reads from a buffer."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        raw = bytes(self.buf[self.pos:self.pos + n])
        if len(raw) != n:
            raise ValueError("string runs past the end of the file")
        self.pos += n
        return raw.decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype not in _SCALARS:
                raise ValueError(f"unsupported array element type {etype}")
            dtype = np.dtype("<" + _SCALARS[etype])
            arr = np.frombuffer(self.buf, dtype, count, self.pos)
            self.pos += count * dtype.itemsize
            return arr.tolist()
        if vtype not in _SCALARS:
            raise ValueError(f"unsupported metadata type {vtype}")
        return self.scalar("<" + _SCALARS[vtype])


def _parse(path: Path) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT

    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data)
    if bytes(data[:4]) != b"GGUF":
        raise ValueError("no GGUF magic number at the start")
    cur.pos = 4
    version = cur.scalar("<I")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version} (big-endian or unknown; versions 2 and 3 "
                         f"are read)")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        infos.append((name, dims, cur.scalar("<I"), cur.scalar("<Q")))
    align = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, qtype, offset in infos:
        if qtype not in GGML_QUANT_SIZES:
            raise ValueError(f"tensor {name!r} has unknown type {qtype}")
        block, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block:
            raise ValueError(f"tensor {name!r}: row of {dims[0]} is not a whole number of blocks")
        n_bytes = dims[0] // block * type_size * int(np.prod(dims[1:], dtype=np.int64))
        if start + offset + n_bytes > data.size:
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype,
                                   start + offset, n_bytes)
    return GGUFFile(path, metadata, tensors, data)


def open_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of the GGUF file at `path` (weights stay on disk, memory-mapped)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise G2ISError(f"GGUF file {p} does not exist")
    try:
        return _parse(p)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as err:
        raise G2ISError(f"{p} is not a readable GGUF file ({err}); it may be truncated or "
                        f"corrupt — download it again") from err


def _f32(value: float) -> float:
    # Metadata floats are float32; recover the decimal that was written (1e-5, not 9.99999975e-6).
    return float(str(np.float32(value)))


def _require(meta: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise G2ISError(f"GGUF file {path} lacks the metadata key {key!r}; it is incomplete or "
                        f"not a language model checkpoint")
    value = meta[key]
    if isinstance(value, list):
        raise G2ISError(f"GGUF file {path}: {key!r} varies per layer, which g2is_jax does not "
                        f"support")
    return value


# ------------------------------------------------------------------------------------------------
# Config


def _architecture(f: GGUFFile) -> str:
    arch = f.metadata.get("general.architecture")
    if arch not in _ARCHS:
        raise G2ISError(
            f"GGUF file {f.path} holds a {arch!r} model; g2is_jax reads GGUF files of the "
            f"architectures {sorted(_ARCHS)} (Llama 2/3, Mistral, SmolLM2, Qwen2). For other "
            f"models, use their Hugging Face checkpoint directory")
    return arch


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> RopeScaling | None:
    kind = f.metadata.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        return RopeScaling("linear", _f32(_require(f.metadata, f"{arch}.rope.scaling.factor",
                                                   f.path)))
    if kind not in (None, "none"):
        raise G2ISError(f"GGUF file {f.path}: rope scaling {kind!r} is not supported "
                        f"(supported: linear, Llama 3.1/3.2 factors)")
    if "rope_freqs.weight" not in f.tensors:
        return None
    factors = _dequantize(f, "rope_freqs.weight").astype(np.float64).reshape(-1)
    plain = rope_inv_freq(head_dim, theta, None).astype(np.float64)
    for preset in _ROPE_FREQS_PRESETS:
        want = plain / rope_inv_freq(head_dim, theta, preset).astype(np.float64)
        if want.shape == factors.shape and np.allclose(factors, want, rtol=1e-4):
            return preset
    raise G2ISError(f"GGUF file {f.path}: its rope_freqs factors match no known Llama 3 rope "
                    f"scaling; load the model from its Hugging Face checkpoint directory")


def gguf_config(f: GGUFFile) -> ModelConfig:
    """The `ModelConfig` described by a GGUF file's metadata and tensor table."""
    meta, arch = f.metadata, _architecture(f)
    if "token_embd.weight" not in f.tensors:
        raise G2ISError(f"GGUF file {f.path} has no token_embd.weight tensor")
    hidden = int(_require(meta, f"{arch}.embedding_length", f.path))
    heads = int(_require(meta, f"{arch}.attention.head_count", f.path))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise G2ISError(f"GGUF file {f.path}: partial rotary embeddings (rope dimension "
                        f"{rope_dim} of head dimension {head_dim}) are not supported")
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    return ModelConfig(
        vocab_size=f.tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=int(_require(meta, f"{arch}.feed_forward_length", f.path)),
        num_layers=int(_require(meta, f"{arch}.block_count", f.path)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_f32(_require(meta, f"{arch}.attention.layer_norm_rms_epsilon", f.path)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(f, arch, head_dim, theta),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        model_type=_ARCHS[arch],
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


# ------------------------------------------------------------------------------------------------
# Weights


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of a q/k projection ([rows, ...] or bias)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise G2ISError(f"cannot un-permute a q/k tensor of {rows} rows over {n_heads} heads")
    half = rows // n_heads // 2
    return (w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _dequantize(f: GGUFFile, name: str) -> np.ndarray:
    import gguf

    t = f.tensors[name]
    qtype = gguf.GGMLQuantizationType(t.qtype)
    try:
        arr = gguf.quants.dequantize(f.raw(name), qtype)
    except NotImplementedError as err:
        raise G2ISError(
            f"GGUF file {f.path}: tensor {name!r} uses the {qtype.name} quantization, which "
            f"the gguf package cannot dequantize; use a file quantized as F32, F16, BF16, "
            f"Q8_0, Q4_0/1, Q5_0/1 or a K-quant") from err
    if tuple(arr.shape) != t.shape:
        raise G2ISError(f"GGUF file {f.path}: tensor {name!r} dequantized to shape "
                        f"{tuple(arr.shape)}, expected {t.shape}; the file may be corrupt")
    return np.asarray(arr, np.float32)


class GGUFTensors(Mapping[str, np.ndarray]):
    """A GGUF file's weights under transformers' names, dequantized (float32) on access.

    Arrays come in PyTorch's ``[out, in]`` layout with llama.cpp's q/k row permutation undone,
    ready for `convert.load_hf_tensors`.
    """

    def __init__(self, f: GGUFFile, config: ModelConfig):
        self._file, self._config = f, config
        self._permute = _architecture(f) in _PERMUTED_ARCHS
        self._names = {}
        unknown = []
        for gguf_name in f.tensors:
            name = _hf_name(gguf_name)
            if name is not None:
                self._names[name] = gguf_name
            elif gguf_name not in _IGNORED:
                unknown.append(gguf_name)
        if unknown:
            raise G2ISError(
                f"GGUF file {f.path} has tensors g2is_jax cannot map (fused or unknown "
                f"layers): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; load the model "
                f"from its Hugging Face checkpoint directory instead")

    def __getitem__(self, name: str) -> np.ndarray:
        arr = _dequantize(self._file, self._names[name])
        if self._permute and (".q_proj." in name or ".k_proj." in name):
            cfg = self._config
            arr = unpermute_qk(arr, cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads)
        return arr

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read (and dequantize) the tensor to answer.
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# ------------------------------------------------------------------------------------------------
# Tokenizer

# Split regexes of the Hugging Face tokenizers these GGUF pre-tokenizer names stand for.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    # GPT-2's byte-level regex alone.
    "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    # StarCoder family, SmolLM/SmolLM2: every digit on its own, then GPT-2's regex.
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3", "smaug-bpe": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


def _pre_tokenizer(kind: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                          use_regex=kind in ("gpt2", "digits"))
    if kind == "gpt2":
        return byte_level
    if kind == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    split = _LLAMA3_SPLIT if kind == "llama3" else _QWEN2_SPLIT
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])


def _post_processor(bos: str | None, eos: str | None, vocab: Mapping[str, int]):
    from tokenizers import processors

    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos is None and eos is None:
        return byte_level

    def sequence(seq: str, type_id: int) -> list[str]:
        return ([f"{bos}:{type_id}"] if bos else []) + [f"${seq}:{type_id}"] + (
            [f"{eos}:{type_id}"] if eos else [])

    template = processors.TemplateProcessing(
        single=sequence("A", 0), pair=sequence("A", 0) + sequence("B", 1),
        special_tokens=list(dict.fromkeys((t, vocab[t]) for t in (bos, eos) if t)))
    return processors.Sequence([byte_level, template])


def _strings(f: GGUFFile, key: str) -> list[str]:
    value = f.metadata.get(key)
    if not isinstance(value, list) or not value:
        raise G2ISError(f"GGUF file {f.path} has no {key!r}: it carries no usable tokenizer; "
                        f"pass a Hugging Face checkpoint directory with tokenizer files instead")
    return value


def gguf_tokenizer(f: GGUFFile) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, as a `PreTrainedTokenizerFast`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    meta, path = f.metadata, f.path
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise G2ISError(
            f"GGUF file {path}: tokenizer model {kind!r} is not supported (g2is_jax rebuilds "
            f"byte-level BPE, 'gpt2', tokenizers); load this model from its Hugging Face "
            f"checkpoint directory instead")
    pre = meta.get("tokenizer.ggml.pre", "gpt2")
    if pre not in _PRE_TOKENIZERS:
        raise G2ISError(
            f"GGUF file {path}: pre-tokenizer {pre!r} is not supported (supported: "
            f"{sorted(_PRE_TOKENIZERS)}); load this model from its Hugging Face checkpoint "
            f"directory instead")
    tokens = _strings(f, "tokenizer.ggml.tokens")
    merges = _strings(f, "tokenizer.ggml.merges")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise G2ISError(f"GGUF file {path}: {len(types)} token types for {len(tokens)} tokens; "
                        f"the tokenizer metadata is corrupt")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    pre_kind = _PRE_TOKENIZERS[pre]
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False, ignore_merges=pre_kind == "llama3")
    tok = Tokenizer(bpe)
    if pre_kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(pre_kind)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not 0 <= int(i) < len(tokens):
            raise G2ISError(f"GGUF file {path}: tokenizer.ggml.{key} = {i} is outside the "
                            f"vocabulary of {len(tokens)} tokens")
        return tokens[int(i)]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    tok.post_processor = _post_processor(
        bos if meta.get("tokenizer.ggml.add_bos_token", False) else None,
        eos if meta.get("tokenizer.ggml.add_eos_token", False) else None, vocab)
    arch = meta.get("general.architecture")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id") or eos,
        chat_template=meta.get("tokenizer.chat_template"),
        model_max_length=int(meta.get(f"{arch}.context_length", 4096)),
        clean_up_tokenization_spaces=False,
    )
