"""Tokenization, loss masks, truncation, buckets and batches (against `tiny_tokenizer`)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from g2is_jax.data import (
    Message,
    Record,
    encode_prompt,
    encode_record,
    encode_records,
    length_buckets,
    make_batches,
)
from g2is_jax.data.tokenize import Encoded, target_slot_count, target_slots
from g2is_jax.errors import G2ISError
from g2is_jax.testing import TINY_DEFAULT_SYSTEM, tiny_tokenizer

TOK = tiny_tokenizer()
EOT = "<|im_end|>"


def _chat(*turns: tuple[str, str], rid: str = "r") -> Record:
    return Record(tuple(Message(r, c) for r, c in turns), "messages", rid, {})


def _runs(enc: Encoded) -> list[np.ndarray]:
    """The maximal runs of consecutive masked positions, as token-id arrays."""
    m = enc.loss_mask.astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], m, [0]])))
    return [enc.input_ids[a:b] for a, b in zip(edges[::2], edges[1::2], strict=True)]


def _decode(ids) -> str:
    return TOK.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _as_dicts(record: Record) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in record.messages]


def test_tiny_tokenizer_is_deterministic_and_chatml():
    other = tiny_tokenizer()
    assert other is not TOK
    assert other.backend_tokenizer.to_str() == TOK.backend_tokenizer.to_str()
    assert 256 < len(TOK) < 1000
    assert TOK.convert_ids_to_tokens([0, 1, 2]) == ["<|endoftext|>", "<|im_start|>", EOT]
    assert TOK.pad_token_id == TOK.eos_token_id == 2
    text = TOK.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == f"<|im_start|>system\n{TINY_DEFAULT_SYSTEM}{EOT}\n<|im_start|>user\nhi{EOT}\n"


def test_mask_covers_exactly_the_assistant_tokens_multi_turn():
    rec = _chat(
        ("system", "Be terse."),
        ("user", "What is 2 + 3?"),
        ("assistant", "5"),
        ("user", "And times 4?"),
        ("assistant", "It is 20."),
    )
    enc = encode_record(rec, TOK)
    assert enc.input_ids.dtype == np.int32 and enc.loss_mask.dtype == np.bool_
    assert not enc.truncated
    assert [_decode(r) for r in _runs(enc)] == ["5" + EOT, "It is 20." + EOT]
    # Unmasked and masked tokens together are the template's whole rendering, in order.
    assert _decode(enc.input_ids) == TOK.apply_chat_template(_as_dicts(rec), tokenize=False)
    # For ordinary text the ids equal tokenizing the whole rendering at once.
    whole = TOK.apply_chat_template(_as_dicts(rec), tokenize=True, return_dict=False)
    assert enc.input_ids.tolist() == list(whole)


def test_default_system_prompt_is_never_in_the_loss():
    enc = encode_record(_chat(("user", "hi"), ("assistant", "hello")), TOK)
    text = _decode(enc.input_ids)
    assert text.startswith(f"<|im_start|>system\n{TINY_DEFAULT_SYSTEM}")
    assert [_decode(r) for r in _runs(enc)] == ["hello" + EOT]
    assert not enc.loss_mask[0]


def test_prompt_completion_has_no_template_and_ends_with_eos():
    rec = Record(
        (Message("user", "Q: 1+1\nA:"), Message("assistant", " 2")), "prompt_completion", "pc", {}
    )
    enc = encode_record(rec, TOK)
    assert _decode(enc.input_ids) == "Q: 1+1\nA: 2" + EOT
    assert [_decode(r) for r in _runs(enc)] == [" 2" + EOT]
    assert enc.input_ids[-1] == TOK.eos_token_id
    assert _decode(encode_prompt(rec, TOK)) == "Q: 1+1\nA:"


def test_position_zero_is_never_in_the_loss():
    # Nothing predicts the first token: with an empty prompt the completion's first token drops.
    rec = Record((Message("user", ""), Message("assistant", "xy z")), "prompt_completion", "e", {})
    enc = encode_record(rec, TOK)
    assert not enc.loss_mask[0] and enc.loss_mask[1:].all()
    assert _decode(enc.input_ids) == "xy z" + EOT


def test_prompt_completion_keeps_the_tokenizers_bos():
    tok = tiny_tokenizer()
    from tokenizers import processors

    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    rec = Record((Message("user", "a"), Message("assistant", "b")), "prompt_completion", "p", {})
    enc = encode_record(rec, tok)
    assert enc.input_ids[0] == 0 and not enc.loss_mask[0]
    assert _decode(enc.input_ids[1:]) == "ab" + EOT


def test_encode_prompt_is_the_generation_prompt():
    rec = _chat(("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    prompt = encode_prompt(rec, TOK)
    expected = TOK.apply_chat_template(
        _as_dicts(rec)[:-1], add_generation_prompt=True, tokenize=False
    )
    assert _decode(prompt) == expected
    enc = encode_record(rec, TOK)
    np.testing.assert_array_equal(enc.input_ids[: len(prompt)], prompt)
    assert enc.loss_mask[len(prompt)] and not enc.loss_mask[len(prompt) - 1]


def test_template_that_trims_content():
    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim "
        "+ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n\n' }}{% endif %}"
    )
    enc = encode_record(_chat(("user", " q "), ("assistant", "  the answer \n")), tok)
    assert [_decode(r) for r in _runs(enc)] == ["the answer" + EOT]


def test_template_errors():
    unstable = tiny_tokenizer()
    # Renders the number of messages up front: a prefix is not a prefix of the whole.
    unstable.chat_template = (
        "{{ messages | length }}{% for m in messages %}{{ m['role'] + ':' + m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    with pytest.raises(G2ISError, match="record r: cannot find the assistant spans"):
        encode_record(_chat(("user", "q"), ("assistant", "a")), unstable)
    strict = tiny_tokenizer()
    strict.chat_template = (
        "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no user first') }}{% endif %}"
    )
    with pytest.raises(G2ISError, match="rejected the conversation: no user first"):
        encode_record(_chat(("user", "q"), ("assistant", "a")), strict)
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(G2ISError, match="no chat template"):
        encode_record(_chat(("user", "q"), ("assistant", "a")), bare)
    with pytest.raises(G2ISError, match="no assistant turn"):
        encode_record(_chat(("user", "q")), TOK)


# --- truncation -----------------------------------------------------------------------------


def test_truncation_is_reported():
    short = _chat(("user", "hi"), ("assistant", "yo"), rid="short")
    long = _chat(("user", "hi"), ("assistant", "word " * 40), rid="long")
    n_short = encode_record(short, TOK).length
    n_long = encode_record(long, TOK, max_length=10_000).length
    max_length = (n_short + n_long) // 2
    encoded, report = encode_records(
        [short, long, short], TOK, max_length=max_length, progress=False
    )
    assert [e.truncated for e in encoded] == [False, True, False]
    assert encoded[1].length == max_length
    assert report.n == 3 and report.n_truncated == 1 and report.truncated_ids == ("long",)
    assert report.lengths.tolist() == [n_short, n_long, n_short]
    assert report.length_stats()["max"] == n_long
    assert "truncated to" in report.summary() and "long" in report.summary()
    assert report.empty_ids == ()


def test_empty_after_truncation_is_an_error_listing_ids():
    recs = [
        _chat(("user", "a long question " * 10), ("assistant", "x"), rid="q-long"),
        _chat(("user", "hi"), ("assistant", "ok"), rid="fine"),
        _chat(("user", "another long one " * 10), ("assistant", "y"), rid="q-long-2"),
    ]
    max_length = encode_record(recs[1], TOK).length
    with pytest.raises(G2ISError) as err:
        encode_records(recs, TOK, max_length=max_length, progress=False)
    msg = str(err.value)
    assert "2 record(s)" in msg and "q-long, q-long-2" in msg and "--max-length" in msg
    assert "fine" not in msg
    with pytest.raises(G2ISError, match="q-long"):
        encode_record(recs[0], TOK, max_length=max_length)
    encoded, report = encode_records(recs, TOK, max_length=max_length, progress=False, check=False)
    assert len(encoded) == 3 and report.empty_ids == ("q-long", "q-long-2")
    with pytest.raises(G2ISError, match="max_length"):
        encode_record(recs[1], TOK, max_length=1)


# --- properties -----------------------------------------------------------------------------

# Text without the tokenizer's special-token strings, with unicode, digits, spaces and newlines.
# Whitespace and markup-like characters are drawn often: they are where span boundaries could go
# wrong (BPE merges across the header's newline, trimming, look-alike markup).
_content = st.text(
    alphabet=st.one_of(
        st.sampled_from(list(" \n\t\r.,:01aZé🤖<|>_")),
        st.characters(codec="utf-8", exclude_categories=("Cs",)),
    ),
    max_size=25,
).filter(lambda s: "<|" not in s)


@st.composite
def _records(draw):
    turns = []
    if draw(st.booleans()):
        turns.append(("system", draw(_content)))
    for _ in range(draw(st.integers(1, 3))):
        turns.append(("user", draw(_content)))
        turns.append(("assistant", draw(_content)))
    return _chat(*turns)


@settings(max_examples=80, deadline=None)
@given(_records())
def test_property_masked_tokens_decode_to_assistant_contents(rec):
    enc = encode_record(rec, TOK, max_length=100_000)
    assistant = [m.content + EOT for m in rec.messages if m.role == "assistant"]
    assert [_decode(r) for r in _runs(enc)] == assistant
    assert _decode(enc.input_ids) == TOK.apply_chat_template(_as_dicts(rec), tokenize=False)
    assert not enc.loss_mask[0]


@settings(max_examples=40, deadline=None)
@given(_records(), st.integers(2, 60))
def test_property_truncation_is_a_prefix(rec, max_length):
    full = encode_record(rec, TOK, max_length=100_000)
    enc, report = encode_records([rec], TOK, max_length=max_length, progress=False, check=False)
    (cut,) = enc
    assert cut.length == min(max_length, full.length)
    assert cut.truncated == (full.length > max_length)
    np.testing.assert_array_equal(cut.input_ids, full.input_ids[:max_length])
    np.testing.assert_array_equal(cut.loss_mask, full.loss_mask[:max_length])
    assert (report.empty_ids == ("r",)) == (cut.n_loss_tokens == 0)


# --- buckets and batches --------------------------------------------------------------------


def test_length_buckets():
    assert length_buckets(2048) == (64, 128, 256, 512, 1024, 2048)
    assert length_buckets(100, min_length=16) == (16, 32, 64, 100)
    assert length_buckets(64) == (64,)
    assert length_buckets(32) == (32,)
    for bad in (0, -5, 1.5, True):
        with pytest.raises(G2ISError):
            length_buckets(bad)


def _fake(lengths: list[int]) -> list[Encoded]:
    out = []
    for i, n in enumerate(lengths):
        ids = np.arange(n, dtype=np.int32) + 10 * i + 3
        mask = np.arange(n) % 2 == 1
        out.append(Encoded(ids, mask, truncated=False))
    return out


def _check_batches(encoded, batches, batch_size, buckets, pad_id):
    seen = []
    for b in batches:
        B, L = b.input_ids.shape
        assert B == batch_size and L in buckets
        assert b.indices.dtype == np.int64 and b.input_ids.dtype == np.int32
        assert b.attention_mask.dtype == np.int32 and b.loss_mask.dtype == np.float32
        real = b.indices[b.indices >= 0]
        longest = max(encoded[i].length for i in real)
        assert L == min(x for x in buckets if x >= longest)  # the smallest bucket that fits
        for r, i in enumerate(b.indices):
            if i < 0:  # padding row
                assert (b.input_ids[r] == pad_id).all()
                assert not b.attention_mask[r].any() and not b.loss_mask[r].any()
                continue
            e, n = encoded[i], encoded[i].length
            np.testing.assert_array_equal(b.input_ids[r, :n], e.input_ids)
            assert (b.input_ids[r, n:] == pad_id).all()
            assert b.attention_mask[r].tolist() == [1] * n + [0] * (L - n)
            np.testing.assert_array_equal(b.loss_mask[r, :n], e.loss_mask.astype(np.float32))
            assert not b.loss_mask[r, n:].any()
        assert (b.indices[: len(real)] >= 0).all()  # padding rows come last
        seen += real.tolist()
    assert sorted(seen) == list(range(len(encoded)))  # every row exactly once


def test_make_batches_bucketed_and_input_order():
    encoded = _fake([5, 70, 3, 64, 65, 130, 8, 1, 200])
    buckets = (64, 128, 256)
    bucketed = make_batches(encoded, batch_size=2, buckets=buckets, pad_id=2)
    _check_batches(encoded, bucketed, 2, buckets, 2)
    assert [b.indices.tolist() for b in bucketed] == [[0, 2], [3, 6], [7, -1], [1, 4], [5, 8]]
    in_order = make_batches(encoded, batch_size=4, buckets=buckets, pad_id=2, order="input")
    _check_batches(encoded, in_order, 4, buckets, 2)
    assert [b.indices.tolist() for b in in_order] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, -1, -1, -1]]
    assert [b.input_ids.shape[1] for b in in_order] == [128, 256, 256]
    assert in_order[2].n_real == 1 and set(in_order[2].arrays()) == {
        "input_ids",
        "attention_mask",
        "loss_mask",
        "target_index",
        "target_mask",
    }


def test_make_batches_shuffle_is_deterministic():
    encoded = _fake([int(n) for n in np.random.default_rng(0).integers(1, 120, size=37)])
    kw = {"batch_size": 4, "buckets": (32, 64, 128), "pad_id": 0}
    a = make_batches(encoded, shuffle_seed=3, **kw)
    b = make_batches(encoded, shuffle_seed=3, **kw)
    c = make_batches(encoded, shuffle_seed=4, **kw)
    plain = make_batches(encoded, **kw)
    order = [x.indices.tolist() for x in a]
    assert order == [x.indices.tolist() for x in b]
    assert order != [x.indices.tolist() for x in c]
    assert order != [x.indices.tolist() for x in plain]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
    _check_batches(encoded, a, 4, (32, 64, 128), 0)


def test_make_batches_errors():
    encoded = _fake([10, 300])
    with pytest.raises(G2ISError, match="longer than the largest bucket 256"):
        make_batches(encoded, batch_size=2, buckets=(128, 256), pad_id=0)
    with pytest.raises(G2ISError, match="batch_size"):
        make_batches(encoded, batch_size=0, buckets=(512,), pad_id=0)
    with pytest.raises(G2ISError, match="order"):
        make_batches(encoded, batch_size=1, buckets=(512,), pad_id=0, order="random")
    with pytest.raises(G2ISError, match="buckets"):
        make_batches(encoded, batch_size=1, buckets=(), pad_id=0)
    assert make_batches([], batch_size=3, buckets=(8,), pad_id=0) == []
    # NumPy integers (e.g. from a config array) are fine.
    (b,) = make_batches(encoded[:1], batch_size=np.int64(2), buckets=np.array([16, 32]), pad_id=0)
    assert b.input_ids.shape == (2, 16)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(1, 100), min_size=1, max_size=40),
    st.integers(1, 8),
    st.sampled_from(["bucketed", "input"]),
    st.one_of(st.none(), st.integers(0, 5)),
)
def test_property_batches(lengths, batch_size, order, seed):
    encoded = _fake(lengths)
    buckets = length_buckets(100, min_length=8)
    batches = make_batches(
        encoded, batch_size=batch_size, buckets=buckets, pad_id=7, order=order, shuffle_seed=seed
    )
    _check_batches(encoded, batches, batch_size, buckets, 7)
    if order == "input" and seed is None:
        flat = [i for b in batches for i in b.indices.tolist() if i >= 0]
        assert flat == list(range(len(lengths)))


def test_real_records_batch_end_to_end():
    recs = [
        _chat(("user", f"q{i} " * (i % 5 + 1)), ("assistant", f"a{i}"), rid=str(i))
        for i in range(11)
    ]
    encoded, _ = encode_records(recs, TOK, max_length=128, progress=False)
    batches = make_batches(
        encoded, batch_size=4, buckets=length_buckets(128, min_length=32), pad_id=TOK.pad_token_id
    )
    _check_batches(encoded, batches, 4, length_buckets(128, min_length=32), TOK.pad_token_id)


def test_target_slot_count_buckets():
    assert [target_slot_count(n, 64) for n in (0, 5, 16, 17, 32, 33, 63)] == [
        16, 16, 16, 32, 32, 64, 64]
    # Three values of K per bucket at most: L/4, L/2, L.
    assert {target_slot_count(n, 2048) for n in range(2048)} == {512, 1024, 2048}
    assert target_slot_count(0, 16) == 8 and target_slot_count(3, 4) == 4  # min 8, cap at L


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(0, 1), min_size=6, max_size=6), min_size=1, max_size=5))
def test_target_slots_list_every_loss_position_in_order(rows):
    lmask = (np.asarray(rows, np.float32) > 0.5) * np.asarray(rows, np.float32)
    index, mask = target_slots(lmask, min_slots=2)
    assert index.dtype == np.int32 and mask.dtype == np.float32 and index.shape == mask.shape
    n = (lmask[:, 1:] > 0).sum(axis=1)
    assert index.shape[1] == target_slot_count(int(n.max()), 6, min_slots=2)
    for b in range(lmask.shape[0]):
        want = np.flatnonzero(lmask[b, 1:] > 0) + 1  # position 0 is never a target
        np.testing.assert_array_equal(index[b, : n[b]], want)
        np.testing.assert_array_equal(mask[b, : n[b]], lmask[b, want])
        assert (index[b, n[b]:] == 0).all() and (mask[b, n[b]:] == 0).all()


def test_make_batches_carry_target_slots():
    encoded = _fake([5, 70, 3, 64, 65, 130, 8, 1, 200])
    for b in make_batches(encoded, batch_size=2, buckets=(64, 128, 256), pad_id=2):
        index, mask = target_slots(b.loss_mask)
        np.testing.assert_array_equal(b.target_index, index)
        np.testing.assert_array_equal(b.target_mask, mask)
        assert b.target_index.shape[1] >= b.loss_mask.sum(axis=1).max()
