"""Content fingerprints of what features and training depend on: model files, arrays, tokenizer.

A resumed `g2is grads`, `g2is warmup` or cached `g2is run` stage compares these instead of the
path text a user typed: ``dir/`` and ``dir`` are the same model, a relative path typed from
another working directory is another model, and weights replaced at the same path are refused.

* `model_fingerprint(spec)`: the files a model spec resolves to (a GGUF file; or a checkpoint
  directory's weights, config and tokenizer files). A file up to `FULL_HASH_BYTES` is hashed in
  full (SmolLM2-135M's 98 MB GGUF: ~0.2 s on one CPU core); a larger one by its size, its first
  `HEAD_BYTES` (the safetensors/GGUF header: every tensor's name, dtype, shape and offset) and
  `SAMPLES` blocks of `SAMPLE_BYTES` at evenly spaced offsets, so a 16 GB checkpoint costs ~12 MB
  of reads per file. A sampled digest misses a change confined to bytes between the samples (a
  few edited values); any fine-tune or merge of the weights changes far more than that.
* `tree_fingerprint(tree)`: every leaf's path, shape, dtype and bytes (LoRA adapters and Adam
  moments: small, hashed in full).
* `tokenizer_fingerprint(tok)`: the tokenizer as loaded (vocabulary, merges, normalisers, chat
  template, special tokens), including defaults filled in by the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from g2is_jax.errors import G2ISError

__all__ = ["FULL_HASH_BYTES", "file_digest", "model_fingerprint", "model_files", "model_path",
           "tokenizer_fingerprint", "tree_fingerprint"]

FULL_HASH_BYTES = 1 << 30
HEAD_BYTES = 8 << 20
SAMPLES = 1024
SAMPLE_BYTES = 4096
# Files of a checkpoint directory that decide what the model computes.
_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".tiktoken", ".jinja", ".gguf")


def file_digest(path: str | os.PathLike[str], *, full_hash_bytes: int = FULL_HASH_BYTES) -> str:
    """SHA-256 of a file's bytes, or of its size, head and evenly spaced samples when it is
    larger than `full_hash_bytes` (see the module docstring)."""
    from g2is_jax.store import file_sha256

    p = Path(path)
    try:
        size = p.stat().st_size
        if size <= full_hash_bytes:
            return file_sha256(p)
        h = hashlib.sha256(f"sampled:{size}:{SAMPLES}x{SAMPLE_BYTES}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(HEAD_BYTES))
            for off in np.linspace(HEAD_BYTES, size - SAMPLE_BYTES, SAMPLES).astype(np.int64):
                f.seek(int(off))
                h.update(f.read(SAMPLE_BYTES))
        return h.hexdigest()
    except OSError as e:
        raise G2ISError(f"cannot read {p} to fingerprint it: {e.strerror or e}") from None


def model_path(model_spec: str | os.PathLike[str]) -> Path:
    """The resolved, absolute GGUF file or checkpoint directory a model spec names."""
    from g2is_jax.models.loading import resolve_spec

    return resolve_spec(model_spec).path.resolve()


def model_files(model_spec: str | os.PathLike[str]) -> list[Path]:
    """The files a model spec resolves to (absolute), in a stable order."""
    from g2is_jax.models.loading import resolve_spec

    src = resolve_spec(model_spec)
    if src.kind == "gguf":
        return [src.path.resolve()]
    root = src.path.resolve()
    return sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                  and (p.suffix in _SUFFIXES or p.name.startswith("tokenizer")))


def model_fingerprint(model_spec: str | os.PathLike[str], *,
                      full_hash_bytes: int = FULL_HASH_BYTES) -> str:
    """A hex digest of the model's content: weights, config and tokenizer files (names, sizes,
    `file_digest` of each). Independent of how the path was typed and of where the files live."""
    h = hashlib.sha256(b"g2is-model-v1")
    for p in model_files(model_spec):
        h.update(f"\0{p.name}\0{p.stat().st_size}\0".encode())
        h.update(file_digest(p, full_hash_bytes=full_hash_bytes).encode())
    return h.hexdigest()


def tree_fingerprint(tree: Any) -> str:
    """A hex digest of a pytree of arrays: each leaf's key path, shape, dtype and bytes."""
    import jax

    h = hashlib.sha256(b"g2is-tree-v1")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    h.update(str(treedef).encode())
    for path, leaf in leaves:
        arr = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
        h.update(f"\0{jax.tree_util.keystr(path)}\0{arr.shape}\0{arr.dtype.str}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hex digest of a (fast) tokenizer as loaded: its serialised model and normalisers, chat
    template and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        sorted(tokenizer.get_vocab().items()))
    doc = {
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {k: str(v) for k, v in sorted(
            getattr(tokenizer, "special_tokens_map", {}).items())},
        "ids": [getattr(tokenizer, k, None) for k in
                ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")],
    }
    h = hashlib.sha256(b"g2is-tokenizer-v1")
    h.update(body.encode())
    h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    return h.hexdigest()
