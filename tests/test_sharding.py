"""Scaling out: the mesh spec and process checks; gradient features and the walk on 4 and 8
simulated devices equal one device's; two processes on loopback (jax.distributed, gloo) running
`g2is grads` and `g2is select` write what one process writes.

One tiny model (an HF checkpoint dir plus a PEFT adapter with random factors) and one pool whose
records all fit the 64-token bucket, so each run compiles a single features program."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from g2is_jax import cli, sharding
from g2is_jax.errors import G2ISError
from g2is_jax.select import g2is_select

ROOT = Path(__file__).resolve().parents[1]
GRADS = ["--gradient", "sgd", "--projection", "sparse", "--dim", "64", "--batch-size", "4",
         "--max-length", "64"]


# ----------------------------------------------------------------------------- specs and checks


def test_mesh_spec_parsing_and_errors():
    assert sharding.parse_mesh("data=4,fsdp=2") == sharding.MeshSpec(4, 2)
    assert sharding.parse_mesh(None).resolve(4) == (4, 1)
    assert sharding.parse_mesh("fsdp=2").resolve(8) == (4, 2)
    mesh = sharding.make_mesh("data=2,fsdp=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2}
    assert sharding.make_mesh(None, jax.devices()[:1]).size == 1
    for bad, words in [("data=3", "multiply to 4"), ("fsdp=3", "not divisible"),
                       ("model=2", "unknown mesh axis"), ("data=2,data=2", "twice"),
                       ("data:2", "axis=size"), ("data=0", "positive"),
                       ("data=-1,fsdp=-1", "at most one")]:
        with pytest.raises(G2ISError, match=words):
            sharding.make_mesh(bad)


def test_process_spec_errors(monkeypatch):
    for var in (sharding.ENV_COORDINATOR, sharding.ENV_NUM_PROCESSES, sharding.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    assert not sharding.process_spec().multi
    assert sharding.initialize_distributed() is False  # one process: nothing to join
    for kwargs, words in [
        (dict(coordinator="h:1", num_processes=2, process_id=2), "out of range"),
        (dict(coordinator="h:1", num_processes=2, process_id=-1), "non-negative"),
        (dict(coordinator="h", num_processes=2, process_id=0), "HOST:PORT"),
        (dict(coordinator="h:99999", num_processes=2, process_id=0), "HOST:PORT"),
        (dict(coordinator="h:1", num_processes=2), "--process-id"),
        (dict(num_processes=2, process_id=0), "--coordinator"),
    ]:
        with pytest.raises(G2ISError, match=words):
            sharding.process_spec(**kwargs)
    monkeypatch.setenv(sharding.ENV_NUM_PROCESSES, "two")
    with pytest.raises(G2ISError, match="JAX_NUM_PROCESSES"):
        sharding.process_spec()


def test_fsdp_axis_and_padding():
    assert sharding.fsdp_axis((400, 32), 2) == 0  # the larger divisible matrix axis
    assert sharding.fsdp_axis((32, 400), 2) == 1
    assert sharding.fsdp_axis((2, 32, 64), 2) == 2  # a stacked layer axis is never split
    assert sharding.fsdp_axis((33, 7), 2) is None and sharding.fsdp_axis((64,), 2) is None
    mesh = sharding.make_mesh("data=2,fsdp=2")
    specs = sharding.fsdp_shardings({"w": np.zeros((8, 6)), "b": np.zeros(6)}, mesh)
    assert specs["w"].spec == P("fsdp", None) and specs["b"].spec == P()
    assert [sharding.pad_rows(n, mesh) for n in (1, 4, 5)] == [4, 4, 8]


def test_fsdp_never_splits_the_layer_axis():
    from flax import nnx

    from g2is_jax.models.config import ModelConfig
    from g2is_jax.models.llama import init_model

    assert sharding.fsdp_axis((16, 64), 2, leading=1) is None  # a stacked vector
    assert sharding.fsdp_axis((16, 7, 7), 2, leading=1) is None  # only the layer axis divides
    assert sharding.fsdp_axis((16, 8, 64), 2, leading=1) == 2
    assert sharding.fsdp_axis((16, 64, 6), 2, leading=1) == 1
    # 8 layers (divisible, and longer than the bias vectors) with q/k/v biases of width 6: a rule
    # blind to the layer axis would split the stacked biases [8, 6] over their layer axis.
    cfg = ModelConfig(vocab_size=16, hidden_size=6, intermediate_size=10, num_layers=8,
                      num_heads=2, num_kv_heads=1, attention_bias=True, model_type="qwen2")
    state = nnx.state(init_model(cfg))
    specs = sharding.fsdp_shardings(state, sharding.make_mesh("data=2,fsdp=2"))
    flat = jax.tree_util.tree_flatten_with_path(specs)[0]
    layer_specs = {jax.tree_util.keystr(p): s.spec for p, s in flat if "'layers'" in str(p)}
    assert len(layer_specs) == 12
    assert all(len(spec) == 0 or spec[0] is None for spec in layer_specs.values()), layer_specs
    assert layer_specs["['layers']['self_attn']['q_proj']['bias'].value"] == P()
    assert layer_specs["['layers']['mlp']['up_proj']['kernel'].value"] == P(None, None, "fsdp")

def test_gather_rows_to_primary_in_bounded_steps_bit_for_bit():
    """One process: the rows reach the sink once each, bit for bit (-0.0, a denormal, a NaN
    payload), in steps whose blocks stay within chunk_bytes; a read error raises G2ISError."""
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((23, 5)).astype(np.float32)
    rows[0, 0], rows[1, 1] = -0.0, np.float32(1e-42)
    rows.view(np.uint32)[2, 2] = 0x7FC0_1234  # a NaN with a payload: no float op may touch it
    where = rng.permutation(100)[:23]
    got, sizes = {}, []

    def sink(idx, block):
        sizes.append(block.shape[0])
        for i, r in zip(idx, block):
            assert int(i) not in got
            got[int(i)] = r.copy()

    width = 8 + 5 * 4
    steps = sharding.gather_rows_to_primary(where, lambda a, b: rows[a:b], sink, dim=5,
                                            chunk_bytes=4 * width + 3)
    assert steps == 6 and sizes == [4, 4, 4, 4, 4, 3]
    assert sorted(got) == sorted(where.tolist())
    for i, k in enumerate(where):
        assert got[int(k)].tobytes() == rows[i].tobytes()
    assert sharding.gather_rows_to_primary(np.zeros(0, np.int64), None, sink, dim=5) == 0

    def broken(a, b):
        raise OSError("disk gone")

    with pytest.raises(G2ISError, match="gathering rows to process 0 failed in process 0: "
                       "disk gone"):
        sharding.gather_rows_to_primary(where, broken, sink, dim=5)
    with pytest.raises(G2ISError, match="chunk_bytes must be a positive integer"):
        sharding.gather_rows_to_primary(where, lambda a, b: rows[a:b], sink, dim=5,
                                        chunk_bytes=0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Model dir, adapter, pool and the one-device reference features (library call)."""
    from g2is_jax.data import build_pool, encode_record, write_jsonl
    from g2is_jax.featurize import compute_features
    from g2is_jax.models.loading import load_model
    from g2is_jax.models.peft import load_peft_adapter
    from g2is_jax.projection import Projector
    from g2is_jax.testing import tiny_hf_model_dir, tiny_peft_adapter_dir, tiny_tokenizer

    root = tmp_path_factory.mktemp("scale")
    tok = tiny_tokenizer()
    model_dir = tiny_hf_model_dir(root / "model")
    adapter = tiny_peft_adapter_dir(root / "adapter", seed=7)
    records = [r for r in build_pool(60, seed=3)
               if encode_record(r, tok, max_length=256).input_ids.shape[0] <= 64][:18]
    assert len(records) == 18
    data = write_jsonl(records, root / "pool.jsonl")
    # The one-device reference, loaded exactly as `g2is grads --adapter` loads it.
    model, tok = load_model(str(model_dir))
    model = load_peft_adapter(model, adapter)
    ref = np.load(compute_features(
        model, tok, records, root / "one", gradient="sgd",
        projector=Projector(kind="sparse", dim=64, seed=0), batch_size=4, max_length=64,
        progress=False, mesh=sharding.make_mesh(None, jax.devices()[:1])))
    np.save(root / "val.npy", ref[:3])
    common = ["--model", str(model_dir), "--data", str(data), "--adapter", str(adapter), *GRADS]
    return {"root": root, "ref": ref, "common": common, "data": data}


def _features_close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


# ----------------------------------------------------------------------------- 4 devices


def test_grads_on_4_devices_equal_one_device(setup, monkeypatch):
    monkeypatch.setattr(cli, "_COMMANDS", ("grads", "select"))
    out = setup["root"] / "four"
    assert jax.device_count() == 4
    assert cli.main(["grads", *setup["common"], "--out", str(out)]) == 0  # default: data=4
    _features_close(np.load(out / "features.npy"), setup["ref"])
    assert not (out / "shards").exists()


@pytest.mark.parametrize("mode", ["onthefly", "graph"])
def test_walk_on_4_devices_selects_the_same_rows(mode):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 40))
    t = (centres[rng.integers(0, 6, 700)] + 0.5 * rng.standard_normal((700, 40)))
    v = centres[:2].repeat(4, 0) + 0.4 * rng.standard_normal((8, 40))
    t, v = t.astype(np.float32), v.astype(np.float32)
    one = g2is_select(t, v, ratio=0.05, delta=0.7, mode=mode)
    four = g2is_select(t, v, ratio=0.05, delta=0.7, mode=mode, mesh=sharding.make_mesh())
    assert len(one.indices) == 35
    assert one.to_json() == four.to_json()


def test_sharded_walk_moves_no_rows_of_t():
    """The compiled on-the-fly walk over 4 devices holds no all-gather: T stays where it is."""
    import jax.numpy as jnp

    from g2is_jax.select import walk

    mesh = sharding.make_mesh()
    unit, sq = walk.prepare_sharded_rows(np.ones((300, 16), np.float32), mesh)
    assert unit.shape == (512, 16) and unit.sharding == sharding.row_sharding(mesh)
    graph = sharding.place_rows(np.zeros((300, 1), np.int32), mesh, 512)
    hlo = walk._walk.lower(unit, sq, jnp.ones((8, 16)), jnp.ones(8, jnp.int32), jnp.int32(300),
                           jnp.float32(0.8), jnp.int32(10), graph, capacity=64,
                           mode="onthefly", bmax=1, mesh=mesh).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" in hlo


# ----------------------------------------------------------------------------- 8 devices


EIGHT = """
import sys, json, numpy as np, jax
from pathlib import Path
from g2is_jax import sharding
from g2is_jax.featurize import compute_features
from g2is_jax.models.loading import load_model
from g2is_jax.models.peft import load_peft_adapter
from g2is_jax.data import load_records
from g2is_jax.projection import Projector
from g2is_jax.select import g2is_select
root = Path(sys.argv[1]); model_dir, adapter, data = sys.argv[2:5]
assert jax.device_count() == 8
model, tok = load_model(model_dir)
model = load_peft_adapter(model, adapter)
feats = np.load(compute_features(
    model, tok, load_records(data), root / "eight", gradient="sgd",
    projector=Projector(kind="sparse", dim=64, seed=0), batch_size=4, max_length=64,
    progress=False, mesh=sharding.make_mesh("data=4,fsdp=2")))
t = np.load(root / "walk_t.npy"); v = np.load(root / "walk_v.npy")
sel = g2is_select(t, v, ratio=0.05, delta=0.7, mesh=sharding.make_mesh())
json.dump(sel.to_json(), open(root / "eight_sel.json", "w"))
"""


@pytest.mark.slow
def test_features_and_walk_on_8_devices_fsdp(setup):
    root = setup["root"]
    rng = np.random.default_rng(1)
    t = rng.standard_normal((900, 24)).astype(np.float32)
    t[:300] += 3 * rng.standard_normal(24).astype(np.float32)  # one dense cluster
    v = (t[:4] + 0.1 * rng.standard_normal((4, 24))).astype(np.float32)
    np.save(root / "walk_t.npy", t)
    np.save(root / "walk_v.npy", v)
    args = [str(root), setup["common"][1], setup["common"][5], setup["common"][3]]
    proc = subprocess.run([sys.executable, "-c", EIGHT, *args], env=_env(8), cwd=root,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _features_close(np.load(root / "eight" / "features.npy"), setup["ref"])
    want = g2is_select(t, v, ratio=0.05, delta=0.7).to_json()
    assert json.loads((root / "eight_sel.json").read_text()) == want


# ----------------------------------------------------------------------------- 2 processes


# One pair of processes (each its own working directory, so they share no output folder) runs,
# with 2 devices each, on loopback: today's shard merge into one --out folder, `g2is select` on
# it, the network gather into a relative --out, and a gather that fails in process 1. (Two tests
# used to start a pair each and both ran the shard merge: one pair saves ~20 s of CI time.)
TWO = """
import json, sys
import numpy as np
from jax.experimental import multihost_utils
from g2is_jax import sharding
from g2is_jax.cli import main
from g2is_jax.errors import G2ISError
port, pid, merged, report, chunk = sys.argv[1:6]
sep = sys.argv.index("--then")
common, select = sys.argv[6:sep], sys.argv[sep + 1:]
join = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", pid]
sent = []  # bytes each process contributes to each collective
allgather = multihost_utils.process_allgather
def recording(tree, tiled=False):
    sent.append(int(np.asarray(tree).nbytes))
    return allgather(tree, tiled)
multihost_utils.process_allgather = recording
sharding.GATHER_CHUNK_BYTES = int(chunk)
assert main(["grads", *common, "--out", merged, *join]) == 0
assert main([*select, *join]) == 0
sent.clear()
assert main(["grads", *common, "--out", "net", "--gather", "network", *join]) == 0
net_sent = list(sent)
def read(lo, hi):  # process 1 cannot read its rows: both processes must raise, none wait
    if pid == "1":
        raise OSError("disk gone")
    return np.zeros((hi - lo, 4), np.float32)
try:
    sharding.gather_rows_to_primary(np.arange(3) + 3 * int(pid), read, lambda i, r: None, dim=4)
    outcome = "returned"
except G2ISError as e:
    outcome = str(e)
json.dump({"sent": net_sent, "outcome": outcome}, open(report, "w"))
"""


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(setup, monkeypatch):
    """In 2 processes × 2 devices (jax.distributed, gloo on loopback), against the 4-device
    single-process run:

    * `g2is grads` into one shared --out (the shard merge), then `g2is select`: features.npy
      and meta.json byte for byte, and the same selection;
    * `g2is grads --gather network`, each process in its own working directory with a relative
      --out (no shared output folder): process 0's features.npy and meta.json are byte-identical
      to the shard merge and to one process; every gather step stays within the chunk bound;
    * a failing process makes both raise instead of hanging."""
    root, common = setup["root"], setup["common"]
    single = root / "four"
    if not (single / "features.npy").exists():  # run alone: make the single-process store
        monkeypatch.setattr(cli, "_COMMANDS", ("grads", "select"))
        assert cli.main(["grads", *common, "--out", str(single)]) == 0
    multi = root / "multi"
    select = ["select", "--train-features", str(multi), "--val-features", str(root / "val.npy"),
              "--ratio", "0.25", "--delta", "0.5", "--data", str(setup["data"]), "--out",
              str(root / "sel")]
    chunk = 2200  # rows of 8 + 64 × 4 bytes: 4 per process per step, so several steps
    port = str(_free_port())
    dirs = [root / f"net-p{i}" for i in range(2)]
    procs = []
    for i, d in enumerate(dirs):
        d.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-c", TWO, port, str(i), str(multi), str(root / f"net-{i}.json"),
             str(chunk), *common, "--then", *select], env=_env(2), cwd=d,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    # The shard merge and the selection on it.
    for name in ("features.npy", "meta.json"):
        assert (multi / name).read_bytes() == (single / name).read_bytes(), name
    assert not (multi / "shards").exists()
    want = g2is_select(np.load(single / "features.npy"), np.load(root / "val.npy"),
                       ratio=0.25, delta=0.5).to_json()
    got = json.loads((root / "sel" / "selection.json").read_text())
    assert len(want["indices"]) == 4
    # The selection itself is identical; the CLI's conventions add the checkpoint weighting and
    # its diagnostics say they were skipped on a mesh, which the library call does not record.
    extra = ("config", "record_ids", "conventions", "diagnostics")
    assert {k: v for k, v in got.items() if k not in extra} == {
        k: v for k, v in want.items() if k not in extra}
    assert got["diagnostics"] == {"skipped": "not computed on a mesh"}
    assert {k: got["conventions"][k] for k in want["conventions"]} == want["conventions"]
    lines = Path(setup["data"]).read_bytes().splitlines(keepends=True)
    assert (root / "sel" / "selected.jsonl").read_bytes() == \
        b"".join(lines[i] for i in want["indices"])

    # The network gather.
    net = dirs[0] / "net"
    for name in ("features.npy", "meta.json"):
        assert (net / name).read_bytes() == (multi / name).read_bytes(), name
        assert (net / name).read_bytes() == (single / name).read_bytes(), name
    assert not (dirs[1] / "net" / "features.npy").exists()
    assert not (net / "shards").exists() and not (dirs[1] / "net" / "shards").exists()
    reports = [json.loads((root / f"net-{i}.json").read_text()) for i in range(2)]
    width = 8 + 64 * 4
    for r in reports:
        blocks = [b for b in r["sent"] if b % width == 0 and b >= width]
        assert len(blocks) >= 3, r["sent"]  # 8 to 10 rows per process, 4 per step
        assert max(r["sent"]) * 2 <= chunk
    assert reports[1]["outcome"] == ("gathering rows to process 0 failed in process 1: "
                                     "disk gone")
    assert reports[0]["outcome"] == ("gathering rows to process 0 failed in process(es) 1: "
                                     "see their messages")
