"""The paper's other model families against transformers' PyTorch models on random tiny configs:
Gemma (GeGLU, (1 + w) RMSNorm, scaled embeddings, head_dim 256, tied head), Gemma 2 (attention-
and final-logit soft-capping, alternating sliding-window layers, sandwich norms,
query_pre_attn_scalar), Mistral's sliding window and Qwen2's sliding layers; their config.json
parsing; KV-cache decoding with windows; PEFT adapters on Gemma 2.

Weights are scaled up from the N(0, 0.02) init so that the soft caps and windows change the
logits (each is checked to matter: a comparison a feature cannot fail proves nothing)."""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import FULL, SLIDING, ModelConfig
from g2is_jax.models.convert import hf_tensors, load_hf_tensors
from g2is_jax.models.llama import KVCache, init_model
from g2is_jax.testing import random_hf_tensors

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=3,
                   num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                   max_position_embeddings=256)
GEMMA2 = dataclasses.replace(
    BASE, model_type="gemma2", hidden_act="gelu_tanh", tie_word_embeddings=True,
    sliding_window=3, query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
    final_logit_softcapping=3.0)
CASES = {
    # head_dim 256, independent of hidden / heads (48 / 2)
    "gemma": dataclasses.replace(BASE, model_type="gemma", hidden_act="gelu_tanh",
                                 tie_word_embeddings=True, num_heads=2, num_kv_heads=1,
                                 head_dim=256),
    "gemma2": GEMMA2,  # layers 0 and 2 slide (window 3), layer 1 is global
    "mistral-window": dataclasses.replace(BASE, model_type="mistral", sliding_window=3),
    "qwen2-window": dataclasses.replace(BASE, model_type="qwen2", attention_bias=True,
                                        rope_theta=1e6, sliding_window=3,
                                        layer_types=(FULL, SLIDING, SLIDING)),
}
# Settings whose removal must change the logits, per case.
ABLATIONS = {
    "gemma": [],
    "gemma2": [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None},
               {"sliding_window": None, "layer_types": None}],
    "mistral-window": [{"sliding_window": None, "layer_types": None}],
    "qwen2-window": [{"sliding_window": None, "layer_types": None}],
}


def tensors_for(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random weights with norms around 1 (random_hf_tensors), q/k, the embedding and the head
    scaled up so that attention scores and logits reach the soft caps (and windows show)."""
    tensors = random_hf_tensors(cfg, seed=seed)
    for name in tensors:
        if ".q_proj.weight" in name or ".k_proj.weight" in name:
            tensors[name] = tensors[name] * 8.0
        elif name == "model.embed_tokens.weight":  # also the tied head: logits ~ 100
            tensors[name] = tensors[name] * 5.0
        elif name == "lm_head.weight":
            tensors[name] = tensors[name] * 20.0
        elif name.endswith(".bias"):
            tensors[name] = np.random.default_rng(seed).normal(
                0, 0.5, tensors[name].shape).astype(np.float32)
    return tensors


def ours(cfg: ModelConfig, tensors: dict):
    model = init_model(cfg, seed=1)
    load_hf_tensors(model, tensors)
    return model


def torch_model(cfg: ModelConfig, tensors: dict):
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"  # soft-capping and windows as written
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def padded_batch(vocab: int, lengths=(11, 7, 3), width: int = 12):
    rng = np.random.default_rng(0)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, vocab, n)
        mask[i, :n] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).logits.numpy()


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    cfg = CASES[name]
    tensors = tensors_for(cfg)
    ids, mask = padded_batch(cfg.vocab_size)
    valid = mask.astype(bool)
    model = ours(cfg, tensors)
    exported = hf_tensors(model)  # the export (save_hf_checkpoint) gives back every tensor
    assert exported.keys() == tensors.keys()
    assert all(np.array_equal(exported[k], tensors[k]) for k in tensors)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    want = torch_logits(torch_model(cfg, tensors), ids, mask)
    err = np.abs(got[valid] - want[valid]).max()
    assert err <= 1e-4, f"{name}: max abs logit error {err:.2e}"
    if cfg.final_logit_softcapping is not None:  # logits large enough for the cap to act
        assert np.abs(want[valid]).max() > cfg.final_logit_softcapping / 2
    for change in ABLATIONS[name]:
        other = np.asarray(ours(dataclasses.replace(cfg, **change), tensors)(
            jnp.asarray(ids), jnp.asarray(mask)))
        assert np.abs(other[valid] - got[valid]).max() > 1e-2, f"{change} changes nothing"


def test_config_json_round_trips_through_transformers():
    # transformers' own serialisation of each config (rope_parameters, layer_types lists, its
    # defaults) parses back to the same ModelConfig.
    for name, cfg in CASES.items():
        hf = transformers.AutoConfig.for_model(**cfg.to_hf()).to_dict()
        assert ModelConfig.from_hf(hf) == cfg, name
        assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg, name


def test_config_json_of_released_models():
    common = {"vocab_size": 256000, "num_hidden_layers": 4, "rms_norm_eps": 1e-6,
              "max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1,
              "pad_token_id": 0}
    # Gemma 7B: legacy hidden_act "gelu" means the tanh approximation; no tie key: tied.
    gemma = ModelConfig.from_hf({
        **common, "architectures": ["GemmaForCausalLM"], "model_type": "gemma",
        "hidden_size": 3072, "intermediate_size": 24576, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu",
        "hidden_activation": None, "rope_theta": 10000.0})
    assert (gemma.hidden_act, gemma.head_dim, gemma.tie_word_embeddings) == (
        "gelu_tanh", 256, True)
    assert gemma.gemma_norm and gemma.embed_scale == pytest.approx(np.sqrt(3072))
    assert gemma.layer_windows() is None and not gemma.sandwich_norms
    # Gemma 2 9B: caps, scalar, window 4096 on even layers.
    gemma2 = ModelConfig.from_hf({
        **common, "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
        "hidden_size": 3584, "intermediate_size": 14336, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0})
    assert gemma2.layer_windows() == (4096, 0, 4096, 0)
    assert (gemma2.query_pre_attn_scalar, gemma2.attn_logit_softcapping,
            gemma2.final_logit_softcapping) == (256, 50.0, 30.0)
    assert gemma2.sandwich_norms and gemma2.tie_word_embeddings
    mistral = {**common, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
               "num_key_value_heads": 8, "hidden_act": "silu", "rope_theta": 10000.0}
    # Mistral 7B v0.1 slides every layer over 4096 tokens (also transformers' default when the
    # key is absent); v0.2 and later set null.
    assert ModelConfig.from_hf({**mistral, "sliding_window": 4096}).layer_windows() == (4096,) * 4
    assert ModelConfig.from_hf(mistral).layer_windows() == (4096,) * 4
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).layer_windows() is None
    # Qwen2: the window applies only with use_sliding_window, from layer max_window_layers on.
    qwen = {**mistral, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "sliding_window": 131072, "max_window_layers": 2, "use_sliding_window": False}
    assert ModelConfig.from_hf(qwen).layer_windows() is None
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": True}).layer_windows() == (
        0, 0, 131072, 131072)
    for bad, match in [({**mistral, "hidden_act": "relu"}, "activation 'relu'"),
                       ({**mistral, "model_type": "llama", "mlp_bias": True}, "mlp_bias"),
                       ({**mistral, "model_type": "gemma3"}, "'gemma3'.*not supported")]:
        with pytest.raises(G2ISError, match=match):
            ModelConfig.from_hf(bad)
    with pytest.raises(G2ISError, match="every layer"):
        dataclasses.replace(CASES["mistral-window"], layer_types=(FULL, SLIDING, SLIDING))
    with pytest.raises(G2ISError, match="Gemma 2 setting"):
        dataclasses.replace(BASE, final_logit_softcapping=30.0)


def test_kv_cache_decoding_with_windows_and_soft_caps():
    # Gemma 2 (sliding and global layers, both caps) decoded token by token from a cache, one
    # row left-padded, equals the full forward.
    cfg = dataclasses.replace(GEMMA2, sliding_window=2)
    model = ours(cfg, tensors_for(cfg, seed=2))
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask),
                            positions=jnp.asarray(positions)))
    cache = KVCache.zeros(cfg, 2, 12)
    prefill, cache = model(jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]),
                           positions=jnp.asarray(positions[:, :6]), cache=cache, cache_index=0)
    real = mask[:, :6].astype(bool)  # row 1's padding slots see no key: nothing to compare
    np.testing.assert_allclose(np.asarray(prefill)[real], full[:, :6][real], atol=1e-4)
    for t in range(6, 9):
        step, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]),
                            positions=jnp.asarray(positions[:, t:t + 1]), cache=cache,
                            cache_index=t)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, t], atol=1e-4)


def test_peft_adapter_on_gemma2_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    from g2is_jax.models.peft import load_peft_adapter, save_peft_adapter

    cfg = GEMMA2
    tensors = tensors_for(cfg, seed=5)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(0)
    ref = peft.get_peft_model(torch_model(cfg, tensors), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    ref.save_pretrained(str(tmp_path / "from-peft"))
    model = load_peft_adapter(ours(cfg, tensors), tmp_path / "from-peft")
    assert set(model.lora_config.target_modules) == {"q", "k", "v", "o", "gate", "up", "down"}
    ids, mask = padded_batch(cfg.vocab_size)
    valid = mask.astype(bool)
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    err = np.abs(got[valid] - torch_logits(ref.eval(), ids, mask)[valid]).max()
    assert err <= 1e-4, f"PEFT -> ours: max abs logit error {err:.2e}"
    # ... and back: our export loads in PEFT on a fresh base to the same function.
    save_peft_adapter(model, tmp_path / "from-ours")
    back = peft.PeftModel.from_pretrained(torch_model(cfg, tensors), str(tmp_path / "from-ours"))
    err = np.abs(got[valid] - torch_logits(back.eval(), ids, mask)[valid]).max()
    assert err <= 1e-4, f"ours -> PEFT: max abs logit error {err:.2e}"
