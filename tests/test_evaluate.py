"""Evaluation: per-record loss in input order, cached greedy decoding against a naive loop,
exact-match normalisation."""

import jax.numpy as jnp
import numpy as np
import pytest

from g2is_jax.data import build_target, encode_record
from g2is_jax.evaluate import (
    evaluate_records,
    exact_match,
    generate,
    normalize_answer,
    score_records,
)
from g2is_jax.models.config import ModelConfig
from g2is_jax.models.llama import example_nll, init_model
from g2is_jax.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    return init_model(cfg, seed=0), tok


def test_scores_in_input_order(tiny):
    model, tok = tiny
    dev, _ = build_target("arithmetic", n_dev=5, n_test=1, seed=0)
    res = score_records(model, tok, dev, batch_size=2, max_length=128, progress=False)
    for i, rec in enumerate(dev):
        enc = encode_record(rec, tok, max_length=128)
        ids = jnp.asarray(enc.input_ids[None])
        want = float(example_nll(model(ids), ids, jnp.asarray(enc.loss_mask[None]))[0])
        assert res.loss[i] == pytest.approx(want, rel=1e-5)
        assert res.n_tokens[i] == int(enc.loss_mask[1:].sum())


def _naive_greedy(model, prompt, n, stops):
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = np.asarray(model(jnp.asarray([seq], jnp.int32)))
        t = int(np.argmax(logits[0, -1]))
        if t in stops:
            break
        out.append(t)
        seq.append(t)
    return out


def test_cached_greedy_matches_naive_loop(tiny):
    model, tok = tiny
    from g2is_jax.evaluate import stop_ids

    prompts = [[5, 17, 33, 8], [40, 2 + 9, 7], list(range(20, 31))]
    got = generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    for p, g in zip(prompts, got):
        assert g == _naive_greedy(model, p, 6, set(stop_ids(tok)))


def test_exact_match_normalisation():
    assert exact_match(" 42. ", "42")
    assert exact_match("so the answer\n#### 1,234", "work...\n#### 1234")
    assert exact_match("apple,  fig", "apple, fig")
    assert exact_match("True.", "True")
    assert not exact_match("41", "42")
    assert not exact_match("true", "True")
    assert normalize_answer("  a  b. ") == "a b"


def test_evaluate_records_generates(tiny):
    model, tok = tiny
    dev, _ = build_target("boolean", n_dev=3, n_test=1, seed=1)
    res = evaluate_records(model, tok, dev, batch_size=2, max_length=128,
                           generate_answers=True, max_new_tokens=4, progress=False)
    assert len(res.predictions) == 3 and res.exact_match.dtype == bool
    s = res.summary()
    assert s["n"] == 3 and np.isfinite(s["mean_loss"]) and 0.0 <= s["exact_match"] <= 1.0
