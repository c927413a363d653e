"""The features driver: rows equal direct per-example gradients in input order, adam features
use the moments, a run killed with SIGKILL and restarted gives a byte-identical file, and a
changed setting is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from g2is_jax.data import encode_record
from g2is_jax.errors import G2ISError
from g2is_jax.featurize import compute_features
from g2is_jax.gradients import AdamMoments
from g2is_jax.models.lora import completion_loss, split_lora
from g2is_jax.projection import Projector, flatten_per_example

# Shared with the subprocess below (kept as source text so both build the same model).
SETUP = """
import jax
from g2is_jax.data import build_pool
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.llama import init_model
from g2is_jax.models.lora import merge_lora, split_lora
from g2is_jax.testing import tiny_tokenizer

tok = tiny_tokenizer()
cfg = ModelConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2)
model = init_model(cfg, LoraConfig(rank=4, alpha=8.0, dropout=0.0), seed=0)
g, base, lora = split_lora(model)
leaves, tdef = jax.tree_util.tree_flatten(lora)
keys = jax.random.split(jax.random.key(7), len(leaves))
lora = jax.tree_util.tree_unflatten(
    tdef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
model = merge_lora(g, base, lora)
records = build_pool(24, seed=3)
"""


@pytest.fixture(scope="module")
def env():
    ns: dict = {}
    exec(SETUP, ns)
    return ns


def test_rows_are_per_example_gradients_in_input_order(env, tmp_path):
    model, tok, records = env["model"], env["tok"], env["records"][:10]
    path = compute_features(model, tok, records, tmp_path / "s", gradient="sgd",
                            projector=Projector(kind="none"), batch_size=4, max_length=128,
                            progress=False)
    feats = np.load(path)
    g, base, lora = split_lora(model)
    grad1 = jax.jit(jax.grad(completion_loss(g)))
    for i in (0, 3, 9):
        enc = encode_record(records[i], tok, max_length=128)
        ex = {"input_ids": enc.input_ids, "attention_mask": np.ones_like(enc.input_ids),
              "loss_mask": enc.loss_mask.astype(np.float32)}
        want = np.asarray(flatten_per_example(jax.tree_util.tree_map(lambda x: x[None],
                                                               grad1(lora, base, ex))))[0]
        np.testing.assert_allclose(feats[i], want, rtol=1e-5, atol=1e-7)
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["record_ids"] == [r.id for r in records] and meta["gradient"] == "sgd"


def test_adam_rows_use_moments(env, tmp_path):
    model, tok, records = env["model"], env["tok"], env["records"][:4]
    g, base, lora = split_lora(model)
    mu = jax.tree_util.tree_map(lambda x: 0.01 * np.ones_like(x), lora)
    nu = jax.tree_util.tree_map(lambda x: 1e-4 * np.ones_like(x), lora)
    moments = AdamMoments(mu, nu)
    sgd = np.load(compute_features(model, tok, records, tmp_path / "a", gradient="sgd",
                                   projector=Projector(kind="none"), batch_size=4,
                                   max_length=128, progress=False))
    adam = np.load(compute_features(model, tok, records, tmp_path / "b", gradient="adam",
                                    projector=Projector(kind="none"), moments=moments,
                                    batch_size=4, max_length=128, progress=False))
    flat_mu = np.asarray(flatten_per_example(jax.tree_util.tree_map(lambda x: x[None], mu)))[0]
    flat_nu = np.asarray(flatten_per_example(jax.tree_util.tree_map(lambda x: x[None], nu)))[0]
    want = (0.9 * flat_mu + 0.1 * sgd) / np.sqrt(0.999 * flat_nu + 0.001 * sgd**2 + 1e-8)
    np.testing.assert_allclose(adam, want, rtol=1e-4, atol=1e-6)


def test_changed_setting_is_refused(env, tmp_path):
    model, tok, records = env["model"], env["tok"], env["records"][:4]
    kw = dict(gradient="sgd", batch_size=4, max_length=128, progress=False)
    compute_features(model, tok, records, tmp_path / "s", projector=Projector(dim=16), **kw)
    with pytest.raises(G2ISError):
        compute_features(model, tok, records, tmp_path / "s", projector=Projector(dim=32), **kw)


KILL_SCRIPT = SETUP + """
import sys, time
import g2is_jax.store as store_mod
from g2is_jax.featurize import compute_features
from g2is_jax.projection import Projector
slow = float(sys.argv[2])
orig = store_mod.FeatureStore.write
def write(self, *a, **k):
    orig(self, *a, **k)
    time.sleep(slow)
store_mod.FeatureStore.write = write
compute_features(model, tok, records, sys.argv[1], gradient="sgd",
                 projector=Projector(kind="rademacher", dim=64, seed=3), batch_size=4,
                 max_length=128, progress=False)
"""


def _run(out, slow):
    return subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(slow)],
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_kill_and_resume_gives_identical_file(tmp_path):
    ref = _run(tmp_path / "ref", 0.0)
    assert ref.wait(timeout=300) == 0
    proc = _run(tmp_path / "cut", 2.0)
    journal = tmp_path / "cut" / "rows.journal"
    deadline = time.time() + 300
    while time.time() < deadline and not (journal.exists() and journal.stat().st_size > 0):
        time.sleep(0.05)
    assert journal.exists() and journal.stat().st_size > 0, "no batch was committed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "features.npy").exists()
    again = _run(tmp_path / "cut", 0.0)
    assert again.wait(timeout=300) == 0
    a = Path(tmp_path / "ref" / "features.npy").read_bytes()
    b = Path(tmp_path / "cut" / "features.npy").read_bytes()
    assert a == b
