"""Warmup LoRA training: loss goes down, a checkpoint per epoch, resume gives the same adapters,
other settings are refused, and the saved Adam moments load for the adam features."""

import json
import shutil

import jax
import numpy as np
import pytest

from g2is_jax.data import build_pool
from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.llama import init_model
from g2is_jax.models.lora import split_lora
from g2is_jax.testing import tiny_tokenizer
from g2is_jax.train import TrainConfig, load_checkpoint, make_schedule, sample_indices, train_lora


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    return init_model(cfg, seed=0), tok


CFG = TrainConfig(fraction=0.5, epochs=3, learning_rate=3e-3, batch_size=4, grad_accum=2,
                  max_length=128, seed=1, warmup_ratio=0.0,
                  lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1))


def _lora_leaves(model):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(split_lora(model)[2])]


def test_train_resume_and_checkpoints(tiny, tmp_path):
    model, tok = tiny
    records = build_pool(40, seed=0)
    full = train_lora(model, tok, records, tmp_path / "a", CFG, progress=False)
    assert len(full.checkpoints) == 3 and all(p.exists() for p in full.checkpoints)
    assert full.losses[-1] < full.losses[0]
    # Linear decay: each epoch's mean learning rate is lower than the one before.
    assert full.epoch_lrs[0] > full.epoch_lrs[1] > full.epoch_lrs[2] > 0

    # Interrupted after epoch 2 (epoch 3's checkpoint lost), the same call resumes.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "3")
    resumed = train_lora(model, tok, records, tmp_path / "b", CFG, progress=False)
    for x, y in zip(_lora_leaves(full.model), _lora_leaves(resumed.model)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8)
    assert resumed.epoch_lrs == pytest.approx(full.epoch_lrs)

    loaded, moments, meta = load_checkpoint(model, full.checkpoints[-1])
    assert meta["epoch"] == 3 and meta["epoch_mean_lr"] == pytest.approx(full.epoch_lrs[2])
    chosen = sample_indices(len(records), CFG.fraction, CFG.seed)
    assert meta["record_ids"] == [records[i].id for i in chosen]
    for x, y in zip(_lora_leaves(full.model), _lora_leaves(loaded)):
        np.testing.assert_array_equal(x, y)
    lora = split_lora(loaded)[2]
    assert jax.tree_util.tree_structure(moments.nu) == jax.tree_util.tree_structure(lora)
    assert all(float(np.min(v)) >= 0 for v in jax.tree_util.tree_leaves(moments.nu))
    assert any(float(np.max(np.abs(m))) > 0 for m in jax.tree_util.tree_leaves(moments.mu))

    # Other settings in the same directory are refused rather than mixed in.
    import dataclasses
    with pytest.raises(G2ISError, match="other settings"):
        train_lora(model, tok, records, tmp_path / "a", dataclasses.replace(CFG, epochs=4),
                   progress=False)
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["train_config"]["epochs"] == 3


def test_schedule_warmup_then_decay():
    cfg = TrainConfig(learning_rate=1.0, warmup_ratio=0.1)
    s = make_schedule(cfg, 100)
    assert float(s(0)) == 0.0 and float(s(10)) == pytest.approx(1.0)
    assert float(s(55)) == pytest.approx(0.5, abs=0.02) and float(s(100)) == pytest.approx(0.0)


def test_sample_indices_seeded():
    a = sample_indices(1000, 0.05, 3)
    assert len(a) == 50 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, sample_indices(1000, 0.05, 3))
    assert not np.array_equal(a, sample_indices(1000, 0.05, 4))


def test_bad_config_is_a_user_error():
    with pytest.raises(G2ISError):
        TrainConfig(fraction=0.0)
    with pytest.raises(G2ISError):
        TrainConfig(schedule="step")


def test_optimizer_with_host_lr_equals_optax_adamw_with_the_schedule():
    """The step scales the lr-free AdamW update by -schedule(update count) (so one compiled step
    serves every schedule); over accumulated micro-batches that must equal optax.adamw given
    the schedule itself, parameters and moments alike."""
    import chex
    import jax.numpy as jnp
    import optax

    from g2is_jax.train import adam_moments, make_optimizer

    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1, grad_accum=3, warmup_ratio=0.25)
    schedule = make_schedule(cfg, 5)
    ref = optax.MultiSteps(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1),
                           every_k_schedule=3)
    ours = make_optimizer(cfg)
    assert make_optimizer(cfg) is ours  # cached: the jitted step is not recompiled per run
    rng = np.random.default_rng(0)
    p_ref = p = {"a": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                 "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    s_ref, s = ref.init(p_ref), ours.init(p)
    for _ in range(15):  # 5 updates of 3 micro-batches
        g = {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for k, v in p.items()}
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u_ref)
        lr = float(schedule(int(s.gradient_step)))
        u, s = ours.update(g, s, p)
        p = optax.apply_updates(p, {k: -lr * v for k, v in u.items()})
    assert int(s.gradient_step) == 5
    chex.assert_trees_all_close(p, p_ref, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(adam_moments(s).nu, adam_moments(s_ref).nu, rtol=1e-6)
