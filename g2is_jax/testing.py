"""Helpers for tests, shipped with the package so that every test module (ours and users') can
build small fixtures without downloads.

`tiny_tokenizer()` is a byte-level BPE tokenizer trained in a few milliseconds on a fixed corpus,
with SmolLM2's special tokens at SmolLM2's ids (0 `<|endoftext|>`, 1 `<|im_start|>`,
2 `<|im_end|>`), pad = eos = `<|im_end|>`, and a ChatML chat template that, like SmolLM2's,
inserts a default system message when the conversation does not start with one.

`tiny_hf_model_dir(path)` writes a tiny random decoder (`tiny_model_config()`: that tokenizer's
vocabulary, 2 layers, hidden size 32) with that tokenizer as a Hugging Face checkpoint
directory, which `load_model`, the CLI and transformers all read. `write_random_checkpoint`
writes a checkpoint of any size tensor by tensor (never a model in memory), for loading tests
at the gigabyte scale.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from g2is_jax.models.config import ModelConfig

__all__ = ["TINY_CHAT_TEMPLATE", "TINY_DEFAULT_SYSTEM", "random_hf_tensors", "tiny_hf_model_dir",
           "tiny_model_config", "tiny_peft_adapter_dir", "tiny_tokenizer",
           "write_random_checkpoint"]

TINY_DEFAULT_SYSTEM = "You are a helpful assistant."

# ChatML, written like SmolLM2's template: a default system turn when the first message is not a
# system message; every turn is `<|im_start|>role\ncontent<|im_end|>\n`.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + TINY_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Training text for the merges: chat markup and the words of the synthetic task suite, so encoded
# test conversations stay short. Any byte string still encodes (byte-level alphabet).
_CORPUS = [
    "system user assistant You are a helpful assistant.",
    "Compute the value. Answer with the number only. What is the result?",
    "Convert kilometers meters grams kilograms hours minutes seconds liters to",
    "Sort these words alphabetically: apple banana cherry grape lemon mango orange pear",
    "Evaluate the boolean expression: True and False or not True. Answer True or False.",
    "Reverse the list. Remove every even number. Add to each number in the list [1, 2, 3].",
    "What date is days after before 2024-01-15? Answer in YYYY-MM-DD format.",
    "Hello! How are you today? Thank you, the capital of France is Paris.",
    "Rewrite the sentence in uppercase letters. the quick brown fox jumps over the lazy dog",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 1000 + - * = ( ) , . : ? !",
]


@functools.lru_cache(maxsize=1)
def _tiny_tokenizer_json() -> str:
    # Imported here: only test code pays for the trainer import.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        min_frequency=2,
        special_tokens=_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh small byte-level BPE `PreTrainedTokenizerFast` with a ChatML chat template.

    Deterministic (same vocabulary and merges on every call) and built without any download; each
    call returns a new object, so a test may mutate it freely.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tiny_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=TINY_CHAT_TEMPLATE,
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )


def random_hf_tensors(cfg, seed: int = 0) -> dict:
    """Random weights of a model with config `cfg` under transformers' names, with norm scales
    drawn around 1 (not all ones) so that every weight matters in a comparison."""
    import numpy as np

    from g2is_jax.models.convert import hf_tensors
    from g2is_jax.models.llama import init_model

    tensors = hf_tensors(init_model(cfg, seed=seed))
    rng = np.random.default_rng(seed)
    for k in tensors:
        if k.endswith("norm.weight"):
            tensors[k] = (1.0 + 0.1 * rng.standard_normal(tensors[k].shape)).astype(np.float32)
    return tensors


def tiny_model_config(**overrides: Any) -> ModelConfig:
    """The tiny decoder the end-to-end tests use: `tiny_tokenizer()`'s vocabulary and EOS, hidden
    size 32, MLP 64, 2 layers, 4 query and 2 key/value heads; `overrides` replace any field."""
    import dataclasses

    from g2is_jax.models.config import ModelConfig

    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, eos_token_id=tok.eos_token_id)
    return dataclasses.replace(cfg, **overrides)


def tiny_hf_model_dir(path: str | Path, *, seed: int = 0, config: ModelConfig | None = None
                      ) -> Path:
    """Write a random model (`config`, default `tiny_model_config()`; weights N(0, 0.02) from
    `seed`) with `tiny_tokenizer()` as a Hugging Face checkpoint directory at `path` (config.json,
    model.safetensors, tokenizer files). Returns the directory."""
    from g2is_jax.models.llama import init_model
    from g2is_jax.models.loading import save_hf_checkpoint

    cfg = config if config is not None else tiny_model_config()
    return save_hf_checkpoint(init_model(cfg, seed=seed), tiny_tokenizer(), Path(path))


def tiny_peft_adapter_dir(path: str | Path, *, seed: int = 0,
                          config: ModelConfig | None = None) -> Path:
    """Write a LoRA adapter (r=4, alpha=8, on the default targets) for the model
    `tiny_hf_model_dir` writes with seed 0, as a PEFT directory at `path`. The factors are
    N(0, 0.05) from `seed` (not PEFT's zero B), so the adapter changes every gradient."""
    import jax

    from g2is_jax.models.config import LoraConfig
    from g2is_jax.models.llama import init_model
    from g2is_jax.models.lora import merge_lora, split_lora
    from g2is_jax.models.peft import save_peft_adapter

    cfg = config if config is not None else tiny_model_config()
    g, base, lora = split_lora(init_model(cfg, LoraConfig(rank=4, alpha=8.0, dropout=0.0), seed=0))
    leaves, tdef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    lora = jax.tree_util.tree_unflatten(
        tdef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    return save_peft_adapter(merge_lora(g, base, lora), Path(path))


def _random_bf16_bits(rng, shape) -> Any:
    """Random bfloat16 values of magnitude in [2^-7, 2^-5) (weights of a ~0.02-scale init),
    made from random bits: ~1 GB/s, where drawing normals would take seconds per gigabyte."""
    import ml_dtypes
    import numpy as np

    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    # sign and 7 mantissa bits random, the exponent 120 or 121 (2^-7 or 2^-6)
    bits = (r & np.uint16(0x807F)) | ((np.uint16(120) + ((r >> 7) & np.uint16(1))) << 7)
    return bits.view(ml_dtypes.bfloat16)


def write_random_checkpoint(path: str | Path, config: ModelConfig, *, dtype: str = "bfloat16",
                            shards: int = 1, seed: int = 0) -> Path:
    """Write a random model with `config` as a Hugging Face checkpoint directory at `path`
    (config.json, `shards` safetensors files with an index when more than one, `tiny_tokenizer()`
    files), one shard's tensors in memory at a time. Matrices hold random bfloat16 values of
    magnitude 2^-7..2^-5 (cast to `dtype`), norm scales 1 + 0.1·N(0, 1). Returns the
    directory."""
    import json

    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    from g2is_jax.models.convert import hf_shapes

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf(), indent=1))
    tiny_tokenizer().save_pretrained(str(directory))
    shapes = hf_shapes(config)
    names = list(shapes)
    rng = np.random.default_rng(seed)
    cast = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}[dtype]
    weight_map = {}
    for s, part in enumerate(np.array_split(np.array(names, dtype=object), shards)):
        tensors = {}
        for name in part:
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * rng.standard_normal(shapes[name])
            else:
                value = _random_bf16_bits(rng, shapes[name])
            tensors[name] = value.astype(cast)
        fname = "model.safetensors" if shards == 1 else \
            f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
    if shards > 1:
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory
