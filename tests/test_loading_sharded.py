"""Streaming, sharded loading (`load_model(spec, mesh=...)`, `g2is_jax.models.streaming`).

A safetensors checkpoint loaded onto a mesh equals the whole-model load leaf for leaf and logit
for logit (tied or not, biases, Gemma 2's sandwich norms, sharded files, float32 or bfloat16),
with the base weights in their `fsdp_shardings`; bad checkpoints fail with the whole path's
messages; and a 1.1 GB checkpoint loads onto 8 simulated devices (``fsdp=8``) with host memory
beyond the placed weights under 40% of the weight bytes, where the whole-model path needs more
than that (so the measurement can tell them apart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2is_jax import sharding
from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.llama import BASE_FILTER
from g2is_jax.models.loading import load_model
from g2is_jax.testing import tiny_model_config, write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraConfig(rank=4, alpha=8.0, target_modules=("q", "v", "down"))


def _flat(model):
    return [(path, var[...]) for path, var in nnx.to_flat_state(nnx.state(model))]


def _logits(model, ids):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, ids))


CASES = {
    "untied-3-shards-f32": (dict(), "float32", 3, "float32"),
    "tied-bias-bf16": (dict(tie_word_embeddings=True, attention_bias=True), "bfloat16", 1,
                       "bfloat16"),
    "f32-file-as-bf16": (dict(), "float32", 2, "bfloat16"),
    "gemma2": (dict(model_type="gemma2", hidden_act="gelu_tanh", head_dim=16,
                    query_pre_attn_scalar=16, sliding_window=4, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0, tie_word_embeddings=True), "bfloat16", 2,
               "float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_model_equals_the_whole_load(tmp_path, case):
    overrides, file_dtype, shards, dtype = CASES[case]
    cfg = tiny_model_config(**overrides)
    directory = write_random_checkpoint(tmp_path / case, cfg, dtype=file_dtype, shards=shards,
                                        seed=len(case))
    mesh = sharding.make_mesh("data=2,fsdp=2")
    streamed, tok = load_model(directory, lora=LORA, dtype=dtype, seed=3, mesh=mesh)
    whole, _ = load_model(directory, lora=LORA, dtype=dtype, seed=3)
    assert streamed.config == whole.config
    want = sharding.fsdp_shardings(nnx.state(whole, BASE_FILTER), mesh)
    want = {p: v.get_value() for p, v in nnx.to_flat_state(want)}
    split = 0
    for (path, got), (path2, ref) in zip(_flat(streamed), _flat(whole), strict=True):
        assert path == path2 and got.dtype == ref.dtype == (
            jnp.float32 if "lora_a" in path or "lora_b" in path else jnp.dtype(dtype))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=str(path))
        if path in want:  # a base leaf: in its FSDP placement
            assert got.sharding.is_equivalent_to(want[path], got.ndim), path
            split += "fsdp" in str(got.sharding.spec)
        else:  # adapters: replicated on the mesh
            assert got.sharding.is_fully_replicated and len(got.sharding.device_set) == 4
    assert split >= 5  # the matrices really are split, so blocks were read per device
    ids = jnp.asarray(tok(["Hello! How are you today?", "Sort: pear apple"],
                          padding="max_length", max_length=12).input_ids, jnp.int32)
    base = nnx.state(whole, BASE_FILTER)  # the same placement: the same program's logits
    nnx.update(whole, sharding.place(base, sharding.fsdp_shardings(base, mesh)))
    np.testing.assert_array_equal(_logits(streamed, ids), _logits(whole, ids))


def test_a_tied_checkpoint_may_repeat_its_embedding_streamed(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = tiny_model_config(tie_word_embeddings=True)
    directory = write_random_checkpoint(tmp_path / "tied", cfg, dtype="float32")
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, str(path))
    mesh = sharding.make_mesh("fsdp=4")
    model, _ = load_model(directory, mesh=mesh)
    assert model.lm_head is None
    tensors["lm_head.weight"][-1, 0] += 1.0  # now a head of its own: the config is wrong
    save_file(tensors, str(path))
    with pytest.raises(G2ISError, match="the config ties the LM head"):
        load_model(directory, mesh=mesh)


def _rewrite(directory: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((8, 32),
                                                                                  np.float32)),
     r"k_proj.weight' in .* has shape \(8, 32\), the config expects \(16, 32\)"),
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
     "lacks tensor 'model.layers.1.mlp.up_proj.weight'"),
])
def test_bad_checkpoints_fail_before_any_weight_is_placed(tmp_path, edit, match):
    directory = write_random_checkpoint(tmp_path / "bad", tiny_model_config(), dtype="float32")
    _rewrite(directory, edit)
    for mesh in (None, sharding.make_mesh("data=2,fsdp=2")):
        with pytest.raises(G2ISError, match=match):
            load_model(directory, mesh=mesh)


def test_place_returns_arrays_already_in_place():
    mesh = sharding.make_mesh("data=2,fsdp=2")
    tree = {"w": np.arange(32.0).reshape(8, 4)}
    shardings = sharding.fsdp_shardings(tree, mesh)
    placed = sharding.place(tree, shardings)
    again = sharding.place(placed, shardings)
    assert again["w"] is placed["w"]  # no copy through the host
    moved = sharding.place(placed, sharding.replicated(mesh))
    assert moved["w"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(moved["w"]), tree["w"])


# ----------------------------------------------------------------------------- 1 GB, 8 devices

# hidden 4096, vocabulary 32768 (untied), MLP 8192, 2 layers of 32 heads (8 KV): 553M weights,
# 1.106 GB in bfloat16. Loaded as bfloat16 onto fsdp=8, where every matrix splits.
BIG = ModelConfig(vocab_size=32768, hidden_size=4096, intermediate_size=8192, num_layers=2,
                  num_heads=32, num_kv_heads=8, eos_token_id=2)

# Run in a fresh process with 8 simulated devices. Host memory is sampled every millisecond
# from /proc/self/status while `load_model` runs, and only then (a peak earlier in the process,
# e.g. while JAX's backend or the tokenizer came up, is not the loader's): the growth of the
# anonymous resident set (RssAnon: every copy the loader makes, and on CPU the devices' buffers)
# and, for the record, of the whole resident set (VmRSS: also the file pages mapped while they
# are read, which the OS can drop). On CPU the devices' buffers ARE host memory, so the weights
# placed on them (counted once per distinct buffer) are subtracted: what remains is what the
# loader itself held on the host at its peak. (A first version measured ru_maxrss over the
# process's life; a CI machine reported 286% for streaming where this machine measured 10%.)
MEASURE = r"""
import ctypes, hashlib, json, sys, threading, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from g2is_jax import sharding
from g2is_jax.models.llama import BASE_FILTER
from g2is_jax.models.loading import load_model, load_tokenizer

mode, directory, out = sys.argv[1:4]
mesh = sharding.make_mesh("fsdp=8")
jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.zeros(8)))  # backends up before measuring
load_tokenizer(directory)  # and transformers' modules imported: not weight memory
def status():
    with open("/proc/self/status") as f:
        kb = dict(line.split(":", 1) for line in f)
    return {k: int(kb[k].split()[0]) * 1024 for k in ("RssAnon", "VmRSS")}
before = status()
peak = dict(before)
done = threading.Event()
def sample():
    while not done.is_set():
        now = status()
        for k in peak:
            peak[k] = max(peak[k], now[k])
        time.sleep(0.001)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
model, _ = load_model(directory, dtype="bfloat16", mesh=mesh if mode == "stream" else None)
done.set()
sampler.join()
now = status()  # what is still held when the load returns counts too
growth = {k: max(peak[k], now[k]) - before[k] for k in peak}
base = nnx.state(model, BASE_FILTER)
leaves = [v[...] for _, v in nnx.to_flat_state(base)]
weights = sum(x.nbytes for x in leaves)
buffers = {}
for x in leaves:
    for s in x.addressable_shards:
        buffers[s.data.unsafe_buffer_pointer()] = s.data.nbytes
# The logits on one device, for both: a forward over the FSDP placement would gather the
# weights on all 8 (several GB here). Moved leaf by leaf, each sharded leaf freed once moved.
one = jax.devices()[0]
def gather(v):
    x = v[...]
    y = jax.device_put(x, one).block_until_ready()
    shared = {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
    if y.unsafe_buffer_pointer() not in shared:  # a copy: the sharded leaf can go
        x.delete()
        try:  # hand the freed blocks back to the OS (glibc keeps them otherwise)
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    return y
gathered = {p: gather(v) for p, v in nnx.to_flat_state(base)}
digests = {"/".join(map(str, p)): hashlib.sha256(np.asarray(x).tobytes()).hexdigest()
           for p, x in gathered.items()}
graphdef, _, rest = nnx.split(model, BASE_FILTER, ...)
state = nnx.from_flat_state([(p, v.replace(gathered[p])) for p, v in nnx.to_flat_state(base)])
ids = jnp.asarray([[5, 17, 300, 2, 41, 99]], jnp.int32)
logits = jax.jit(lambda s, r, x: nnx.merge(graphdef, s, r)(x))(state, rest, ids)
np.save(out, np.asarray(logits))
print(json.dumps({"growth": growth["RssAnon"], "growth_rss": growth["VmRSS"],
                  "device": sum(buffers.values()), "weights": weights,
                  "digests": digests}))
"""


def _measure(mode: str, directory: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run([sys.executable, "-c", MEASURE, mode, str(directory), str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_1gb_checkpoint_streams_onto_8_devices_in_bounded_host_memory(tmp_path):
    directory = write_random_checkpoint(tmp_path / "big", BIG, dtype="bfloat16", shards=2)
    try:
        stream = _measure("stream", directory, tmp_path / "stream.npy")
        whole = _measure("whole", directory, tmp_path / "whole.npy")
        weights = stream["weights"]
        assert weights >= 1e9 and whole["weights"] == weights
        extra = (stream["growth"] - stream["device"]) / weights
        whole_extra = (whole["growth"] - whole["device"]) / weights
        rss = [(m["growth_rss"] - m["device"]) / weights for m in (stream, whole)]
        line = (f"host memory beyond the placed weights, as a share of {weights / 1e9:.3f} GB: "
                f"streamed {extra:.1%}, whole-model load {whole_extra:.1%} (anonymous memory); "
                f"with mapped file pages {rss[0]:.1%} and {rss[1]:.1%}")
        print(line)
        assert extra < 0.40, f"streaming held too much on the host: {line}"
        assert whole_extra > 0.40, "the measurement does not see the whole-model load's copy"
        assert stream["digests"] == whole["digests"]  # every leaf, byte for byte
        np.testing.assert_array_equal(np.load(tmp_path / "stream.npy"),
                                      np.load(tmp_path / "whole.npy"))
    finally:
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
