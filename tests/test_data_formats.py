"""Record formats: detection, conversion, loading, bad input, writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from g2is_jax.data import (
    Message,
    Record,
    convert_record,
    detect_format,
    load_records,
    record_to_json,
    scan_records,
    write_jsonl,
)
from g2is_jax.errors import G2ISError


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write_lines(path, [json.dumps(r) for r in rows])


# --- each format converts -------------------------------------------------------------------


def test_messages_format():
    raw = {
        "dataset": "flan_v2",
        "id": "flan_v2_7",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
    }
    rec = convert_record(raw, index=3, source="data/pool.jsonl")
    assert rec.format == "messages"
    assert rec.id == "flan_v2_7"
    assert rec.messages == (
        Message("system", "Be brief."),
        Message("user", "2+2?"),
        Message("assistant", "4"),
    )
    assert rec.meta == {"dataset": "flan_v2"}


def test_alpaca_format_with_and_without_input():
    rec = convert_record(
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "domain": "mt"},
        index=0,
        source="a.jsonl",
    )
    assert rec.format == "alpaca"
    assert rec.messages == (Message("user", "Translate.\n\nBonjour"), Message("assistant", "Hello"))
    assert rec.meta == {"domain": "mt"}
    assert rec.id == "a-0"
    bare = convert_record(
        {"instruction": "Say hi.", "input": "", "output": "hi"}, index=5, source="b.json"
    )
    assert bare.messages == (Message("user", "Say hi."), Message("assistant", "hi"))
    assert bare.id == "b-5"


def test_alpaca_system_and_history():
    rec = convert_record(
        {
            "system": "S",
            "history": [["q1", "a1"]],
            "instruction": "q2",
            "output": "a2",
        },
        index=0,
        source="x.jsonl",
    )
    roles = [(m.role, m.content) for m in rec.messages]
    assert roles == [
        ("system", "S"),
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]


def test_sharegpt_format():
    raw = {
        "id": 12,
        "conversations": [
            {"from": "system", "value": "sys"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "human", "value": "bye"},
            {"from": "gpt", "value": "bye!"},
        ],
    }
    rec = convert_record(raw, index=0, source="sg.jsonl")
    assert rec.format == "sharegpt"
    assert rec.id == "12"
    assert [m.role for m in rec.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert rec.messages[2].content == "hello"


def test_prompt_completion_format():
    rec = convert_record({"prompt": "Q: 1+1\nA:", "completion": " 2"}, index=1, source="pc.jsonl")
    assert rec.format == "prompt_completion"
    assert rec.messages == (Message("user", "Q: 1+1\nA:"), Message("assistant", " 2"))
    assert rec.reference == " 2"


def test_detect_format_and_none_means_absent():
    # datasets fills keys a row lacks with None: they must not change the detected format.
    assert (
        detect_format({"messages": None, "prompt": "p", "completion": "c"}) == "prompt_completion"
    )
    assert detect_format({"conversations": []}) == "sharegpt"
    rec = convert_record(
        {"instruction": "i", "input": None, "output": "o", "answer": None}, index=0, source="f"
    )
    assert rec.messages[0].content == "i" and rec.meta == {}


def test_reference_prefers_meta_answer():
    rec = convert_record(
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}],
            "answer": "b",
        },
        index=0,
        source="f",
    )
    assert rec.reference == "b"


# --- bad input: each case gets its own error ------------------------------------------------

_BAD_ROWS = [
    ({"text": "hello"}, "unknown format"),
    ({"messages": []}, "empty conversation"),
    ({"conversations": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        "missing field 'messages[0].content'",
    ),
    ({"instruction": "q"}, "missing field 'output'"),
    ({"completion": "c"}, "missing field 'prompt'"),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
        "'messages[0].content' has type int, expected a string",
    ),
    ({"prompt": ["p"], "completion": "c"}, "'prompt' has type list, expected a string"),
    (
        {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "a"}]},
        "missing field 'conversations[0].value'",
    ),
    ({"messages": "hi"}, "'messages' has type str, expected a list"),
    (
        {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}]},
        "role 'tool'",
    ),
    ({"conversations": [{"from": "alien", "value": "x"}]}, "from 'alien'"),
    (
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        "starts with an assistant turn",
    ),
    ({"prompt": "p", "completion": "  "}, "every assistant turn is empty"),
    ({"id": [1], "prompt": "p", "completion": "c"}, "'id' has type list"),
    ({"messages": ["x"]}, "messages[0] has type str, expected an object"),
]


@pytest.mark.parametrize("raw, expected", _BAD_ROWS)
def test_bad_rows_name_source_index_problem_and_fix(raw, expected):
    with pytest.raises(G2ISError) as err:
        convert_record(raw, index=7, source="bad.jsonl")
    msg = str(err.value)
    assert msg.startswith("bad.jsonl: record 7: ")
    assert expected in msg
    assert "Fix:" in msg


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = _write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "a", "completion": "b"}),
            "",
            '{"prompt": "a", "completion": "b"',
        ],
    )
    with pytest.raises(G2ISError) as err:
        load_records(path)
    msg = str(err.value)
    assert str(path) in msg and "record 1 (line 3)" in msg and "malformed JSON" in msg


def test_non_object_line_and_invalid_utf8(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", ["[1, 2]"])
    with pytest.raises(G2ISError, match=r"line 1\).*has type list, expected a JSON object"):
        load_records(path)
    raw = tmp_path / "u.jsonl"
    raw.write_bytes(b'{"prompt": "\xff", "completion": "c"}\n')
    with pytest.raises(G2ISError, match="not valid UTF-8"):
        load_records(raw)


def test_bad_record_in_file_names_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"foo": 1}])
    with pytest.raises(G2ISError, match=r"d\.jsonl: record 1 \(line 2\): unknown format"):
        load_records(path)


def test_whole_file_errors(tmp_path):
    with pytest.raises(G2ISError, match="no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(G2ISError, match="unsupported file type"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(G2ISError, match="no records"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "arr.json").write_text('[{"prompt": "a", "completion": "b"},\n {"prompt": ]')
    with pytest.raises(G2ISError, match=r"arr\.json: malformed JSON at line 2"):
        load_records(tmp_path / "arr.json")
    with pytest.raises(G2ISError, match="limit"):
        load_records(tmp_path / "arr.json", limit=0)


def test_scan_records_lists_every_problem(tmp_path):
    path = _write_lines(
        tmp_path / "d.jsonl",
        [
            json.dumps({"prompt": "a", "completion": "b"}),
            "{oops",
            json.dumps({"messages": []}),
            json.dumps({"instruction": "i", "output": "o"}),
        ],
    )
    records, problems = scan_records(path)
    assert [r.id for r in records] == ["d-0", "d-3"]
    assert len(problems) == 2
    assert "record 1 (line 2)" in problems[0] and "malformed JSON" in problems[0]
    assert "record 2 (line 3)" in problems[1] and "empty conversation" in problems[1]


# --- loading --------------------------------------------------------------------------------


def test_load_jsonl_json_array_and_json_lines_in_json(tmp_path):
    rows = [
        {"prompt": "p0", "completion": "c0"},
        {"instruction": "i1", "output": "o1"},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]},
    ]
    a = load_records(_jsonl(tmp_path / "rows.jsonl", rows))
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=2))
    b = load_records(tmp_path / "rows.json")
    c = load_records(_jsonl(tmp_path / "lines.json", rows))
    assert [r.format for r in a] == ["prompt_completion", "alpaca", "sharegpt"]
    assert [r.messages for r in a] == [r.messages for r in b] == [r.messages for r in c]
    assert [r.id for r in a] == ["rows-0", "rows-1", "rows-2"]
    assert [r.id for r in c] == ["lines-0", "lines-1", "lines-2"]
    assert len(load_records(tmp_path / "rows.jsonl", limit=2)) == 2


def test_load_skips_blank_lines_and_bom(tmp_path):
    path = tmp_path / "d.jsonl"
    row = json.dumps({"prompt": "a", "completion": "b"})
    path.write_text("\ufeff" + row + "\n\n   \n" + row + "\n", encoding="utf-8")
    recs = load_records(path)
    assert [r.id for r in recs] == ["d-0", "d-1"]


def test_load_parquet_through_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
            "id": "m1",
            "domain": "x",
        },
        {
            "messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}],
            "id": "m2",
            "domain": None,
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    recs = load_records(tmp_path / "d.parquet")
    assert [r.id for r in recs] == ["m1", "m2"]
    assert recs[0].meta == {"domain": "x"} and recs[1].meta == {}
    assert recs[1].messages == (Message("user", "q2"), Message("assistant", "a2"))


# --- writing --------------------------------------------------------------------------------


def test_write_jsonl_round_trip(tmp_path):
    records = [
        Record(
            (Message("user", "q"), Message("assistant", "a")),
            "messages",
            "r0",
            {"domain": "d", "kind": "clean", "answer": "a"},
        ),
        Record(
            (Message("user", "Q:"), Message("assistant", " x")), "prompt_completion", "r1", {"n": 3}
        ),
    ]
    path = write_jsonl(records, tmp_path / "sub" / "out.jsonl")
    assert load_records(path) == records
    assert [p.name for p in path.parent.iterdir()] == ["out.jsonl"]  # no temporary file left


def test_write_jsonl_alpaca_becomes_messages(tmp_path):
    rec = convert_record(
        {"instruction": "i", "input": "x", "output": "o", "tag": 1}, index=0, source="s"
    )
    (back,) = load_records(write_jsonl([rec], tmp_path / "o.jsonl"))
    assert back.format == "messages"
    assert (back.messages, back.id, back.meta) == (rec.messages, rec.id, rec.meta)


def test_write_jsonl_errors_leave_nothing(tmp_path):
    clash = Record(
        (Message("user", "q"), Message("assistant", "a")), "messages", "r", {"messages": 1}
    )
    with pytest.raises(G2ISError, match="clash"):
        write_jsonl([clash], tmp_path / "o.jsonl")
    bad = Record(
        (Message("user", "q"), Message("assistant", "a")), "messages", "r", {"x": object()}
    )
    with pytest.raises(G2ISError, match="JSON-serialisable"):
        write_jsonl([bad], tmp_path / "o.jsonl")
    assert list(tmp_path.iterdir()) == []


# --- properties -----------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=30)
_nonblank = _text.filter(lambda s: s.strip() != "")


@st.composite
def _conversations(draw):
    """A conversation the converters accept: optional system, user first, >= 1 assistant."""
    turns = []
    if draw(st.booleans()):
        turns.append(("system", draw(_text)))
    for _ in range(draw(st.integers(1, 3))):
        turns.append(("user", draw(_text)))
        turns.append(("assistant", draw(_nonblank)))
    return turns


@settings(max_examples=80, deadline=None)
@given(
    _conversations(),
    st.dictionaries(
        st.sampled_from(["dataset", "domain", "n"]), st.one_of(st.integers(), _text), max_size=2
    ),
)
def test_property_formats_agree_and_round_trip(turns, meta):
    as_messages = {"messages": [{"role": r, "content": c} for r, c in turns], **meta}
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    as_sharegpt = {"conversations": [{"from": speaker[r], "value": c} for r, c in turns], **meta}
    a = convert_record(as_messages, index=0, source="s")
    b = convert_record(as_sharegpt, index=0, source="s")
    assert a.messages == b.messages == tuple(Message(r, c) for r, c in turns)
    assert a.meta == b.meta == meta
    again = convert_record(json.loads(json.dumps(record_to_json(a))), index=9, source="t")
    assert again == a


@settings(max_examples=60, deadline=None)
@given(_text, _text, _nonblank)
def test_property_alpaca_and_prompt_completion(instruction, extra, output):
    rec = convert_record(
        {"instruction": instruction, "input": extra, "output": output}, index=0, source="s"
    )
    user = rec.messages[0].content
    assert user.startswith(instruction) and user.endswith(extra)
    assert rec.messages[-1] == Message("assistant", output)
    pc = convert_record({"prompt": instruction, "completion": output}, index=0, source="s")
    assert pc.messages == (Message("user", instruction), Message("assistant", output))
    again = convert_record(json.loads(json.dumps(record_to_json(pc))), index=0, source="s")
    assert again.format == "prompt_completion" and again.messages == pc.messages
