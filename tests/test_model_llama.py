"""Our decoder against transformers' PyTorch Llama / Qwen2 / Mistral on random tiny configs."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2is_jax.data.tokenize import target_slots
from g2is_jax.models.config import LoraConfig, ModelConfig, RopeScaling
from g2is_jax.models.convert import hf_tensors, load_hf_tensors
from g2is_jax.models.llama import (
    KVCache,
    Llama,
    example_nll,
    init_model,
    target_hidden,
    target_nll,
    with_lora,
)
from g2is_jax.models.lora import batch_nll, completion_loss, split_lora, token_mean_loss

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BASE = ModelConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                   num_heads=6, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=256)

CASES = {
    "llama-gqa": BASE,
    "llama-tied": dataclasses.replace(BASE, tie_word_embeddings=True, num_kv_heads=6),
    "llama3-rope-scaling": dataclasses.replace(
        BASE, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    "llama-linear-rope": dataclasses.replace(BASE, rope_scaling=RopeScaling("linear", 2.0)),
    "qwen2-bias": dataclasses.replace(BASE, model_type="qwen2", attention_bias=True,
                                      rope_theta=1e6),
    "mistral": dataclasses.replace(BASE, model_type="mistral"),
    "head-dim-override": dataclasses.replace(BASE, head_dim=16),
}


def torch_model(cfg: ModelConfig, tensors):
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32)
    sd = {k: torch.from_numpy(v) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    # Tied heads are absent from the state dict by design; nothing else may be missing.
    assert set(missing) <= {"lm_head.weight"}, missing
    return model.eval()


def random_batch(rng, vocab, lengths, width):
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(0, vocab, n)
        mask[i, :n] = 1
    return ids, mask


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name):
    cfg = CASES[name]
    model = init_model(cfg, seed=1)
    # Non-trivial norm scales and biases so that every weight matters.
    tensors = hf_tensors(model)
    rng = np.random.default_rng(0)
    for k in tensors:
        if k.endswith("norm.weight") or k.endswith(".bias"):
            tensors[k] = (1.0 + 0.1 * rng.standard_normal(tensors[k].shape)).astype(np.float32)
    load_hf_tensors(model, tensors)
    ref = torch_model(cfg, tensors)

    ids, mask = random_batch(rng, cfg.vocab_size, [11, 7, 3], 12)  # padded batch
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        theirs = ref(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    valid = mask.astype(bool)
    err = np.abs(ours[valid] - theirs[valid]).max()
    assert err <= 1e-4, f"{name}: max abs logit error {err:.2e}"


def test_padding_does_not_change_real_positions():
    model = init_model(CASES["llama-gqa"], seed=2)
    rng = np.random.default_rng(1)
    ids, mask = random_batch(rng, 97, [5], 5)
    short = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    pad_ids = np.pad(ids, ((0, 0), (0, 9)))
    pad_mask = np.pad(mask, ((0, 0), (0, 9)))
    long = np.asarray(model(jnp.asarray(pad_ids), jnp.asarray(pad_mask)))
    np.testing.assert_allclose(long[:, :5], short, atol=1e-5)


def test_lora_b_zero_is_identity_and_split_merge():
    cfg = CASES["llama-gqa"]
    plain = init_model(cfg, seed=3)
    lora_model = with_lora(plain, LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                                             target_modules=("q", "v", "gate", "down")))
    ids = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
    np.testing.assert_allclose(np.asarray(plain(ids)), np.asarray(lora_model(ids)), atol=1e-6)
    graphdef, base, lora = split_lora(lora_model)
    paths = {tuple(str(p) for p in path) for path, _ in jax.tree_util.tree_flatten_with_path(
        lora)[0]}
    assert paths and all(any("lora_" in s for s in path) for path in paths)
    assert not any("lora_" in str(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0])


def test_loss_masks_prompt_and_pad_tokens():
    cfg = CASES["llama-gqa"]
    model = init_model(cfg, LoraConfig(rank=4, alpha=8.0, dropout=0.0), seed=4)
    graphdef, base, lora = split_lora(model)
    loss = completion_loss(graphdef)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, cfg.vocab_size, 10).astype(np.int32)
    mask = np.ones(10, np.int32)
    lmask = np.zeros(10, np.float32)
    lmask[6:9] = 1  # targets: tokens 6, 7, 8
    got = float(loss(lora, base, {"input_ids": ids, "attention_mask": mask, "loss_mask": lmask}))
    logits = np.asarray(model(jnp.asarray(ids[None])))[0].astype(np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    want = -np.mean([logp[t - 1, ids[t]] for t in (6, 7, 8)])
    assert abs(got - want) < 1e-5
    # Changing a prompt-free token after the completion (masked) does not change the loss.
    ids2 = ids.copy()
    ids2[9] = (ids2[9] + 1) % cfg.vocab_size
    got2 = float(loss(lora, base, {"input_ids": ids2, "attention_mask": mask,
                                   "loss_mask": lmask}))
    assert got2 == pytest.approx(got, abs=1e-6)


def test_example_nll_empty_mask_is_zero():
    logits = jnp.zeros((1, 4, 5))
    assert float(example_nll(logits, jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4)))[0]) == 0.0


def test_target_nll_equals_example_nll():
    # The loss from the logits at the target slots only equals the loss from all logits, with
    # gaps in the mask (several completion spans), empty rows, and a mask set at position 0
    # (ignored by both: nothing predicts token 0).
    rng = np.random.default_rng(8)
    b, length, vocab = 4, 20, 13
    logits = rng.standard_normal((b, length, vocab)).astype(np.float32)
    ids = rng.integers(0, vocab, (b, length)).astype(np.int32)
    lmask = (rng.random((b, length)) < 0.4).astype(np.float32)
    lmask[0, 0] = 1.0
    lmask[2] = 0.0
    index, tmask = target_slots(lmask)
    assert index.shape[1] >= int(lmask[:, 1:].sum(axis=1).max())
    gathered = target_hidden(jnp.asarray(logits), jnp.asarray(index))
    got = np.asarray(target_nll(gathered, ids, index, tmask))
    want = np.asarray(example_nll(jnp.asarray(logits), ids, lmask))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert got[2] == 0.0


@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied"])
def test_loss_with_target_slots_equals_full_head(name):
    cfg = CASES[name]
    model = init_model(cfg, LoraConfig(rank=4, alpha=8.0, dropout=0.1), seed=7)
    graphdef, base, lora = split_lora(model)
    rng = np.random.default_rng(9)
    ids, mask = random_batch(rng, cfg.vocab_size, [11, 7, 3, 12], 12)
    lmask = ((rng.random(mask.shape) < 0.6) & (mask > 0)).astype(np.float32)
    batch = {"input_ids": ids, "attention_mask": mask, "loss_mask": lmask}
    index, tmask = target_slots(lmask)
    fast = {**batch, "target_index": index, "target_mask": tmask}
    np.testing.assert_allclose(np.asarray(batch_nll(graphdef, lora, base, fast)),
                               np.asarray(batch_nll(graphdef, lora, base, batch)), rtol=1e-6)
    # The training objective too, with dropout (same key, same mask draws).
    key = jax.random.key(3)
    loss = token_mean_loss(graphdef)
    assert float(loss(lora, base, fast, key)) == pytest.approx(
        float(loss(lora, base, batch, key)), rel=1e-6)


def test_kv_cache_decoding_matches_full_forward():
    cfg = CASES["qwen2-bias"]
    model = init_model(cfg, seed=5)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, cfg.vocab_size, (2, 9)).astype(np.int32)
    # Row 1 is left-padded by 3: its tokens sit in slots 3..8 with positions 0..5.
    mask = np.ones((2, 9), np.int32)
    mask[1, :3] = 0
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask), positions=jnp.asarray(positions)))
    cache = KVCache.zeros(cfg, 2, 12)
    prefill, cache = model(jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]),
                           positions=jnp.asarray(positions[:, :6]), cache=cache, cache_index=0)
    np.testing.assert_allclose(np.asarray(prefill)[0], full[0, :6], atol=1e-5)
    for t in range(6, 9):
        step, cache = model(jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]),
                            positions=jnp.asarray(positions[:, t:t + 1]), cache=cache,
                            cache_index=t)
        np.testing.assert_allclose(np.asarray(step)[:, 0], full[:, t], atol=1e-5)
    # The left-padded row against an unpadded run of its 6 real tokens.
    alone = np.asarray(model(jnp.asarray(ids[1:, 3:])))
    np.testing.assert_allclose(full[1, 3:], alone[0], atol=1e-5)


def test_bfloat16_close_to_float32():
    cfg = CASES["llama-gqa"]
    m32 = init_model(cfg, seed=6)
    m16 = init_model(cfg, seed=6, dtype="bfloat16")
    load_hf_tensors(m16, hf_tensors(m32))
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 97, (2, 8)), jnp.int32)
    a, b = np.asarray(m32(ids)), np.asarray(m16(ids))
    assert b.dtype == np.float32
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max() + 0.05


def test_forward_temporary_memory_is_a_fraction_of_the_weights():
    # 16 layers of a small-vocabulary config, so that layer weights dominate. Traced abstractly
    # (no weight is materialised). Stacking the layers' weights on every call, as the decoder
    # did before its layers were stored stacked, measured 232 MB of temporaries for 219 MB of
    # weights here; scanning over the stored stack, 14 MB (one layer slice and activations).
    cfg = ModelConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_layers=16,
                      num_heads=8, num_kv_heads=8)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))
    assert weight_bytes > 200e6

    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, mask)

    ids = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    compiled = jax.jit(forward).lower(state, ids, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.25 * weight_bytes, \
        f"temp {temp / 1e6:.1f} MB for {weight_bytes / 1e6:.1f} MB of weights"
