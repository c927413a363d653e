"""Per-example gradients: vmap(grad) against a loop of grad, against PyTorch + peft (LESS's
way), and the Adam/sign feature formulas against hand computations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2is_jax.data.tokenize import Encoded, make_batches, target_slots
from g2is_jax.gradients import (
    AdamMoments,
    adam_features,
    feature_fn,
    gradient_features,
    per_example_grads,
)
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.convert import hf_tensors
from g2is_jax.models.llama import init_model
from g2is_jax.models.lora import completion_loss, split_lora
from g2is_jax.projection import flatten_per_example

CFG = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5)
LORA = LoraConfig(rank=4, alpha=16.0, dropout=0.0, target_modules=("q", "k", "v", "o"))


def _randomize_lora(lora, seed):
    leaves, tdef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(
        tdef, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def make_batch(lengths, width, prompt_len=3, seed=0):
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = np.zeros((b, width), np.int32)
    attn = np.zeros((b, width), np.int32)
    lmask = np.zeros((b, width), np.float32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(1, CFG.vocab_size, n)
        attn[i, :n] = 1
        lmask[i, min(prompt_len, n - 1):n] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lmask}


@pytest.fixture(scope="module")
def setup():
    model = init_model(CFG, LORA, seed=0)
    graphdef, base, lora = split_lora(model)
    return graphdef, base, _randomize_lora(lora, 1)


def test_vmap_matches_loop_with_padding(setup):
    graphdef, base, lora = setup
    loss = completion_loss(graphdef)
    batch = make_batch([9, 4, 12, 6], width=16)
    batched = jax.jit(per_example_grads(loss))(lora, base, batch)
    grad1 = jax.jit(jax.grad(loss))
    for i, n in enumerate([9, 4, 12, 6]):
        # Each record alone, unpadded: padding must not change its gradient.
        ex = {k: v[i, :n] for k, v in batch.items()}
        single = grad1(lora, base, ex)
        chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x: x[i], batched), single,
                                    rtol=1e-5, atol=1e-7)


def with_targets(batch):
    index, mask = target_slots(batch["loss_mask"])
    return {**batch, "target_index": index, "target_mask": mask}


def test_target_slots_give_the_full_head_gradients(setup):
    # The fast path (LM head at the K loss positions only) against the plain one (head at every
    # position, then the loss mask): same per-example gradients on a padded batch of mixed
    # lengths, with completions longer than the smallest K (8 = 32 / 4) and a padding row.
    graphdef, base, lora = setup
    loss = completion_loss(graphdef)
    lengths = [30, 4, 12, 19, 1]
    batch = make_batch(lengths, width=32, prompt_len=2, seed=5)
    batch["loss_mask"][4] = 0
    batch["attention_mask"][4] = 0
    batch["loss_mask"][3, 8:12] = 0  # two completion spans (a multi-turn record)
    fast = with_targets(batch)
    assert fast["target_index"].shape == (5, 32)  # 28 targets in row 0
    assert int(fast["target_mask"].sum(axis=1).max()) > 16
    grads = jax.jit(per_example_grads(loss))
    want = grads(lora, base, batch)
    got = grads(lora, base, fast)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
    rows = np.asarray(flatten_per_example(got))
    assert np.abs(rows[4]).max() == 0 and np.abs(rows[:4]).max(axis=1).min() > 0
    values = jax.vmap(loss, in_axes=(None, None, 0))
    np.testing.assert_allclose(values(lora, base, fast), values(lora, base, batch), rtol=1e-6)


def test_make_batches_targets_match_unpadded_single_records(setup):
    # Batches as `g2is grads` builds them (make_batches adds the target slots), each record's
    # fast-path gradient against its own plain gradient, unpadded.
    graphdef, base, lora = setup
    rng = np.random.default_rng(7)
    encoded = []
    for n, start in [(14, 2), (5, 3), (11, 9), (16, 1), (7, 4)]:
        mask = np.zeros(n, bool)
        mask[start:] = True
        encoded.append(Encoded(rng.integers(1, CFG.vocab_size, n).astype(np.int32), mask, False))
    (b1, b2) = make_batches(encoded, batch_size=3, buckets=(8, 16), pad_id=0)
    loss = completion_loss(graphdef)
    grads = jax.jit(per_example_grads(loss))
    grad1 = jax.jit(jax.grad(loss))
    for b in (b1, b2):
        arrays = b.arrays()
        assert {"target_index", "target_mask"} <= set(arrays)
        got = grads(lora, base, arrays)
        for r, i in enumerate(b.indices):
            if i < 0:
                continue
            e = encoded[i]
            ex = {"input_ids": e.input_ids, "attention_mask": np.ones(e.length, np.int32),
                  "loss_mask": e.loss_mask.astype(np.float32)}
            chex.assert_trees_all_close(jax.tree_util.tree_map(lambda x, r=r: x[r], got),
                                        grad1(lora, base, ex), rtol=1e-5, atol=1e-6)


def test_flattened_gradient_column_order():
    # The order documented in g2is_jax.models.lora: leaves in sorted-path order, each stacked
    # leaf [L, ...] raveled with the layer slowest (layer 0's block, then layer 1's).
    from g2is_jax.models.lora import LORA_FLAT_ORDER

    assert LORA_FLAT_ORDER == "stacked-v1"
    lora_cfg = LoraConfig(rank=2, alpha=4.0, dropout=0.0, target_modules=("q", "v", "down"))
    _, _, lora = split_lora(init_model(CFG, lora_cfg, seed=0))
    leaves, tdef = jax.tree_util.tree_flatten_with_path(lora)
    names = [".".join(str(getattr(k, "key", k)) for k in path[:-1]) for path, _ in leaves]
    assert names == [f"layers.{m}.{f}" for m in ("mlp.down_proj", "self_attn.q_proj",
                                                  "self_attn.v_proj")
                     for f in ("lora_a", "lora_b")]
    tagged = [jnp.broadcast_to(100.0 * k + jnp.arange(CFG.num_layers).reshape(-1, 1, 1),
                               x.shape) for k, (_, x) in enumerate(leaves)]
    row = np.asarray(flatten_per_example(
        jax.tree_util.tree_map(lambda x: x[None], jax.tree_util.tree_unflatten(tdef, tagged))))[0]
    want = np.concatenate([np.full(int(np.prod(x.shape[1:])), 100.0 * k + layer)
                           for k, (_, x) in enumerate(leaves) for layer in range(CFG.num_layers)])
    np.testing.assert_array_equal(row, want)


def test_padding_row_has_zero_gradient(setup):
    graphdef, base, lora = setup
    batch = make_batch([5, 1], width=8)
    batch["attention_mask"][1] = 0
    batch["loss_mask"][1] = 0
    grads = per_example_grads(completion_loss(graphdef))(lora, base, batch)
    rows = np.asarray(flatten_per_example(grads))
    assert np.abs(rows[0]).max() > 0
    assert np.abs(rows[1]).max() == 0


def test_adam_feature_formula_by_hand():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 5)).astype(np.float32)
    m = rng.standard_normal(5).astype(np.float32)
    v = rng.random(5).astype(np.float32)
    got = np.asarray(adam_features({"w": jnp.asarray(g)},
                                   AdamMoments({"w": jnp.asarray(m)}, {"w": jnp.asarray(v)}))["w"])
    for i in range(3):
        for j in range(5):
            m1 = 0.9 * m[j] + 0.1 * g[i, j]
            v1 = 0.999 * v[j] + 0.001 * g[i, j] ** 2
            assert got[i, j] == pytest.approx(m1 / np.sqrt(v1 + 1e-8), rel=1e-5)


def test_sign_and_sgd_features():
    g = {"a": jnp.asarray([[-2.0, 0.0, 3.0]])}
    np.testing.assert_array_equal(gradient_features(g, "sign")["a"], [[-1.0, 0.0, 1.0]])
    assert gradient_features(g, "sgd") is g
    from g2is_jax.errors import G2ISError
    with pytest.raises(G2ISError, match="moments"):
        gradient_features(g, "adam")
    with pytest.raises(G2ISError, match="unknown gradient type"):
        gradient_features(g, "rmsprop")


def test_feature_fn_flags_non_finite(setup):
    graphdef, base, lora = setup
    f = feature_fn(completion_loss(graphdef), "sgd")
    batch = make_batch([6, 6], width=8)
    bad = jax.tree_util.tree_map(lambda x: x, lora)
    leaves, tdef = jax.tree_util.tree_flatten(bad)
    leaves[0] = leaves[0].at[0, 0].set(jnp.nan)
    feats, finite = f(jax.tree_util.tree_unflatten(tdef, leaves), base, batch)
    assert not bool(np.any(np.asarray(finite)))
    feats, finite = f(lora, base, batch)
    assert bool(np.all(np.asarray(finite)))
    # Rows are the per-example gradients flattened in tree order.
    grads = jax.jit(per_example_grads(completion_loss(graphdef)))(lora, base, batch)
    # Same math, compiled as a separate program: equal up to float32 reassociation.
    np.testing.assert_allclose(np.asarray(feats), np.asarray(flatten_per_example(grads)), rtol=1e-5,
                               atol=1e-7)


def test_sgd_gram_matches_pytorch_peft_loop(setup):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    graphdef, base, lora = setup
    model = init_model(CFG, LORA, seed=0)
    # Torch twin: same base weights, a peft adapter with the same (non-zero) A and B.
    hf_cfg = transformers.AutoConfig.for_model(**CFG.to_hf())
    hf_cfg._attn_implementation = "eager"
    tmodel = transformers.AutoModelForCausalLM.from_config(hf_cfg, torch_dtype=torch.float32)
    tmodel.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in
                            hf_tensors(model).items()}, strict=False)
    pcfg = peft.LoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pmodel = peft.get_peft_model(tmodel, pcfg).eval()
    named = dict(pmodel.named_parameters())
    for i in range(CFG.num_layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            ours = lora["layers"]["self_attn"][p]  # stacked: layer i is index i
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            with torch.no_grad():
                named[f"{pre}.lora_A.default.weight"].copy_(
                    torch.from_numpy(np.asarray(ours["lora_a"][...])[i].T.copy()))
                named[f"{pre}.lora_B.default.weight"].copy_(
                    torch.from_numpy(np.asarray(ours["lora_b"][...])[i].T.copy()))
    lengths = [9, 4, 12, 6, 7]
    batch = make_batch(lengths, width=12, seed=3)
    ours = np.asarray(flatten_per_example(jax.jit(per_example_grads(completion_loss(graphdef)))(
        lora, base, batch)), np.float64)
    # LESS's loop: batch size 1, labels -100 outside the completion, loss.backward().
    rows = []
    lora_params = [p for n, p in pmodel.named_parameters() if "lora_" in n]
    for i, n in enumerate(lengths):
        ids = torch.from_numpy(batch["input_ids"][i:i + 1, :n]).long()
        labels = ids.clone()
        labels[0, batch["loss_mask"][i, :n] == 0] = -100
        pmodel.zero_grad()
        pmodel(input_ids=ids, labels=labels).loss.backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in lora_params]).double().numpy())
    theirs = np.stack(rows)
    assert ours.shape == theirs.shape
    g_ours, g_theirs = ours @ ours.T, theirs @ theirs.T
    rel = np.linalg.norm(g_ours - g_theirs) / np.linalg.norm(g_theirs)
    assert rel < 1e-4, f"Gram matrices differ: relative Frobenius error {rel:.2e}"
