"""PEFT adapters both ways: made by `peft` -> ours, ours -> `peft`, with equal logits."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from g2is_jax.errors import G2ISError
from g2is_jax.models.config import LoraConfig, ModelConfig
from g2is_jax.models.convert import hf_tensors
from g2is_jax.models.llama import init_model, with_lora
from g2is_jax.models.peft import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_peft_adapter,
    lora_config_from_peft,
    save_peft_adapter,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                  num_kv_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def base():
    """Our base model and its weights under transformers' names."""
    model = init_model(CFG, seed=11)
    return model, hf_tensors(model)


def torch_base(tensors):
    hf_cfg = transformers.AutoConfig.for_model(**CFG.to_hf())
    hf_cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    model.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=True)
    return model.eval()


def batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return ids, mask


def ours_logits(model):
    ids, mask = batch()
    return np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), mask.astype(bool)


def torch_logits(model):
    ids, mask = batch()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(),
                    attention_mask=torch.from_numpy(mask).long()).logits
    return out.numpy()


def peft_adapter(tensors, directory, targets, *, rslora=False, r=4, alpha=8):
    """An adapter made and saved by `peft`, with non-zero random A and B."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                          use_rslora=rslora, task_type="CAUSAL_LM")
    model = peft.get_peft_model(torch_base(tensors), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.2)
    model.save_pretrained(str(directory))
    return model.eval()


@pytest.mark.parametrize("targets,rslora", [
    (["q_proj", "v_proj"], False),
    (ALL, False),
    (["k_proj", "gate_proj", "down_proj"], True),
])
def test_adapter_from_peft_gives_peft_logits(base, tmp_path, targets, rslora):
    model, tensors = base
    ref = peft_adapter(tensors, tmp_path, targets, rslora=rslora)
    ours = load_peft_adapter(model, tmp_path)
    assert {f"{m}_proj" for m in ours.lora_config.target_modules} == set(targets)
    got, valid = ours_logits(ours)
    want = torch_logits(ref)
    err = np.abs(got[valid] - want[valid]).max()
    assert err <= 1e-4, f"max abs logit error {err:.2e}"
    # The adapter must matter, or the comparison above proves nothing.
    plain, _ = ours_logits(model)
    assert np.abs(plain[valid] - got[valid]).max() > 1e-2


def test_our_adapter_loads_in_peft(base, tmp_path):
    model, tensors = base
    lora = LoraConfig(rank=4, alpha=12.0, dropout=0.05, target_modules=("q", "o", "up", "down"))
    ours = with_lora(model, lora, seed=3)
    rng = np.random.default_rng(7)
    for _, var in nnx.to_flat_state(nnx.state(ours, nnx.LoRAParam)):
        var[...] = jnp.asarray(rng.normal(0, 0.2, var[...].shape), jnp.float32)
    save_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama")

    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12
    assert cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "up_proj"]
    ref = peft.PeftModel.from_pretrained(torch_base(tensors), str(tmp_path)).eval()
    got, valid = ours_logits(ours)
    want = torch_logits(ref)
    err = np.abs(got[valid] - want[valid]).max()
    assert err <= 1e-4, f"max abs logit error {err:.2e}"
    plain, _ = ours_logits(model)
    assert np.abs(plain[valid] - got[valid]).max() > 1e-2


def test_round_trip_is_exact(base, tmp_path):
    model, _ = base
    ours = with_lora(model, LoraConfig(rank=3, alpha=5.0, dropout=0.0,
                                       target_modules=("v", "gate")), seed=1)
    gate_b = ours.layers.mlp.gate_proj.lora_b  # stacked over layers: [2, 3, intermediate]
    gate_b[...] = gate_b[...].at[1].set(jnp.full((3, CFG.intermediate_size), 0.5))
    save_peft_adapter(ours, tmp_path)
    back = load_peft_adapter(model, tmp_path)
    assert back.lora_config == ours.lora_config
    a = nnx.to_flat_state(nnx.state(ours, nnx.LoRAParam))
    b = dict(nnx.to_flat_state(nnx.state(back, nnx.LoRAParam)))
    # 2 targets x 2 factors, each stacked over the 2 layers.
    assert len(a) == len(b) == 2 * 2
    assert all(var[...].shape[0] == 2 for _, var in a)
    for path, var in a:
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(b[path][...]))


def test_rslora_scale_is_folded_into_alpha(base, tmp_path):
    _, tensors = base
    peft_adapter(tensors, tmp_path, ["q_proj"], rslora=True, r=16, alpha=8)
    cfg = lora_config_from_peft(tmp_path)
    assert cfg.rank == 16
    assert cfg.scaling == pytest.approx(8 / math.sqrt(16))


# ------------------------------------------------------------------------------------------------
# Bad adapters


@pytest.fixture
def adapter_dir(base, tmp_path):
    model, _ = base
    ours = with_lora(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0,
                                       target_modules=("q", "v")), seed=0)
    return save_peft_adapter(ours, tmp_path / "adapter")


def edit_config(directory, **changes):
    path = directory / ADAPTER_CONFIG
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"peft_type": "PREFIX_TUNING"}, "only LoRA"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lacks.*lm_head"),
    ({"target_modules": ["q_proj"]}, "v_proj.*does not list"),
    ({"r": 8}, "r = 8"),
    ({"use_dora": True}, "use_dora"),
    ({"layers_to_transform": [0]}, "layers_to_transform"),
    ({"rank_pattern": {"q_proj": 2}}, "rank_pattern"),
    ({"r": 0}, "positive integer"),
])
def test_bad_config_is_refused(base, adapter_dir, changes, match):
    model, _ = base
    edit_config(adapter_dir, **changes)
    with pytest.raises(G2ISError, match=match) as info:
        load_peft_adapter(model, adapter_dir)
    assert "adapter" in str(info.value)  # names the file


def test_missing_files_and_tensors(base, adapter_dir):
    from safetensors.numpy import load_file, save_file

    model, _ = base
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del weights[name]
    save_file(weights, str(adapter_dir / ADAPTER_WEIGHTS))
    with pytest.raises(G2ISError, match="lacks tensor.*layers.1.self_attn.v_proj.lora_B"):
        load_peft_adapter(model, adapter_dir)
    (adapter_dir / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(G2ISError, match="adapter_model.safetensors does not exist"):
        load_peft_adapter(model, adapter_dir)
    (adapter_dir / ADAPTER_CONFIG).unlink()
    with pytest.raises(G2ISError, match="not a PEFT adapter directory"):
        load_peft_adapter(model, adapter_dir)


def test_adapter_for_a_deeper_model_is_refused(adapter_dir):
    shallow = init_model(ModelConfig(**{**CFG.__dict__, "num_layers": 1}), seed=0)
    with pytest.raises(G2ISError, match="layer.*\\[1\\].*only 1 layers"):
        load_peft_adapter(shallow, adapter_dir)


def test_adapter_for_a_wider_model_is_refused(adapter_dir):
    wide = init_model(ModelConfig(**{**CFG.__dict__, "hidden_size": 64}), seed=0)
    with pytest.raises(G2ISError, match="has shape .*another model"):
        load_peft_adapter(wide, adapter_dir)


def test_saving_a_model_without_adapters_is_refused(base, tmp_path):
    model, _ = base
    with pytest.raises(G2ISError, match="no LoRA adapters"):
        save_peft_adapter(model, tmp_path)
