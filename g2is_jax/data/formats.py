"""Instruction records: four input formats, one internal form.

Every input row becomes a `Record`: a tuple of `Message`s (system/user/assistant), the format it
came in, an id, and `meta` (every other field the row carried, e.g. dataset, domain, answer).
The format is detected per row, by its keys:

- ``messages`` (LESS/OpenAI): ``{"messages": [{"role", "content"}, ...]}``
- ``sharegpt``: ``{"conversations": [{"from", "value"}, ...]}`` (human/gpt/system roles)
- ``alpaca``: ``{"instruction", "input"?, "output", "system"?, "history"?}``; the user turn is
  the instruction, then a blank line and the input when there is one
- ``prompt_completion``: ``{"prompt", "completion"}``: plain text, no chat template; stored as
  (user prompt, assistant completion)

Reading. JSON Lines (and ``.json`` files, either an array of rows or JSON Lines) are parsed here,
line by line, so a malformed line is reported with its file and line number and every row keeps
exactly the keys and types it had. (`datasets`' JSON builder would unify the schema across rows:
fill keys a row lacks with None, fail on mixed types with an Arrow error, and write a cache.)
Parquet files, dataset directories and hub names go through `datasets`; None values, which Arrow
uses for a key a row lacked, count as absent.

Errors. Any bad row is a `G2ISError` naming the file, the record index (0-based position among
the file's rows; plus the line for JSON Lines), the problem, and the fix. `scan_records` collects
every problem instead of stopping at the first one (for `g2is data-check`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from g2is_jax.errors import G2ISError
from g2is_jax.io import atomic_open

__all__ = [
    "FORMATS",
    "ROLES",
    "Message",
    "Record",
    "convert_record",
    "detect_format",
    "load_records",
    "read_raw_records",
    "record_to_json",
    "scan_records",
    "write_jsonl",
]

ROLES = ("system", "user", "assistant")
FORMATS = ("messages", "alpaca", "sharegpt", "prompt_completion")

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_JSON_SUFFIXES = (".json",)
_PARQUET_SUFFIXES = (".parquet",)
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}
# Keys each format consumes; the rest of a row (minus "id") goes to Record.meta.
_FORMAT_KEYS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "input", "output", "system", "history"),
    "prompt_completion": ("prompt", "completion"),
}


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class Record:
    """One instruction example in the internal form (see the module docstring)."""

    messages: tuple[Message, ...]
    format: str  # one of FORMATS
    id: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """The expected answer for exact match: ``meta["answer"]`` if a string, else the last
        assistant message."""
        answer = self.meta.get("answer")
        if isinstance(answer, str):
            return answer
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")


class _Problem(Exception):
    """A bad row: what is wrong and how to fix it (turned into a G2ISError with its location)."""

    def __init__(self, problem: str, fix: str):
        super().__init__(problem)
        self.problem, self.fix = problem, fix


def _present(raw: Mapping[str, Any]) -> set[str]:
    return {k for k, v in raw.items() if v is not None}


def detect_format(raw: Mapping[str, Any]) -> str:
    """The format of one row, from its keys; raises `G2ISError` when no format matches."""
    try:
        return _detect(raw)
    except _Problem as p:
        raise G2ISError(f"{p.problem}. Fix: {p.fix}") from None


def _detect(raw: Mapping[str, Any]) -> str:
    keys = _present(raw)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if keys & {"instruction", "output"}:
        return "alpaca"
    if keys & {"prompt", "completion"}:
        return "prompt_completion"
    shown = ", ".join(sorted(map(str, raw))) or "none"
    raise _Problem(
        f"unknown format (keys: {shown})",
        'give each row one of: "messages" [{role, content}], "conversations" [{from, value}], '
        '"instruction"+"output" (alpaca), or "prompt"+"completion"',
    )


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(raw: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            raise _Problem(f"missing field '{where}{key}'", f"add a string '{where}{key}'")
        return None
    if not isinstance(value, str):
        raise _Problem(
            f"field '{where}{key}' has type {_type_name(value)}, expected a string",
            f"store '{where}{key}' as a JSON string",
        )
    return value


def _turn_list(raw: Mapping[str, Any], key: str) -> Sequence[Any]:
    turns = raw[key]
    if isinstance(turns, str) or not isinstance(turns, Sequence):
        raise _Problem(
            f"field {key!r} has type {_type_name(turns)}, expected a list of turns",
            f"store {key!r} as a JSON array of objects",
        )
    if len(turns) == 0:
        raise _Problem("empty conversation", f"give {key!r} at least a user and an assistant turn")
    return turns


def _turn(turn: Any, key: str, i: int) -> Mapping[str, Any]:
    if not isinstance(turn, Mapping):
        raise _Problem(
            f"{key}[{i}] has type {_type_name(turn)}, expected an object",
            f"make every element of {key!r} a JSON object",
        )
    return turn


def _from_messages(raw: Mapping[str, Any]) -> list[Message]:
    out = []
    for i, turn in enumerate(_turn_list(raw, "messages")):
        turn = _turn(turn, "messages", i)
        role = _string(turn, "role", f"messages[{i}].")
        content = _string(turn, "content", f"messages[{i}].")
        if role not in ROLES:
            raise _Problem(
                f"messages[{i}] has role {role!r}",
                f"use one of the roles {', '.join(ROLES)}",
            )
        out.append(Message(role, content))
    return out


def _from_sharegpt(raw: Mapping[str, Any]) -> list[Message]:
    out = []
    for i, turn in enumerate(_turn_list(raw, "conversations")):
        turn = _turn(turn, "conversations", i)
        speaker = _string(turn, "from", f"conversations[{i}].")
        value = _string(turn, "value", f"conversations[{i}].")
        role = _SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise _Problem(
                f"conversations[{i}] is from {speaker!r}",
                f"use one of {', '.join(sorted(_SHAREGPT_ROLES))} in 'from'",
            )
        out.append(Message(role, value))
    return out


def _from_alpaca(raw: Mapping[str, Any]) -> list[Message]:
    instruction = _string(raw, "instruction", "")
    extra = _string(raw, "input", "", required=False)
    output = _string(raw, "output", "")
    system = _string(raw, "system", "", required=False)
    out = [Message("system", system)] if system else []
    history = raw.get("history")
    if history is not None:
        if isinstance(history, str) or not isinstance(history, Sequence):
            raise _Problem(
                f"field 'history' has type {_type_name(history)}, expected a list of pairs",
                'store "history" as [[instruction, response], ...]',
            )
        for i, pair in enumerate(history):
            ok = isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2
            if not ok or not all(isinstance(s, str) for s in pair):
                raise _Problem(
                    f"history[{i}] is not a pair of strings",
                    'store "history" as [[instruction, response], ...]',
                )
            out += [Message("user", pair[0]), Message("assistant", pair[1])]
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return out + [Message("user", user), Message("assistant", output)]


def _from_prompt_completion(raw: Mapping[str, Any]) -> list[Message]:
    prompt = _string(raw, "prompt", "")
    completion = _string(raw, "completion", "")
    return [Message("user", prompt), Message("assistant", completion)]


_CONVERTERS = {
    "messages": _from_messages,
    "sharegpt": _from_sharegpt,
    "alpaca": _from_alpaca,
    "prompt_completion": _from_prompt_completion,
}


def _check_conversation(messages: list[Message]) -> None:
    roles = [m.role for m in messages]
    if "assistant" not in roles:
        raise _Problem(
            f"no assistant turn (roles: {', '.join(roles)})",
            "add the assistant's reply: the loss is computed on assistant turns only",
        )
    first = next(m for m in messages if m.role != "system")
    if first.role != "user":
        raise _Problem(
            "the conversation starts with an assistant turn",
            "put the user turn that the first assistant turn answers before it",
        )
    if all(not m.content.strip() for m in messages if m.role == "assistant"):
        raise _Problem(
            "every assistant turn is empty",
            "give the assistant turn(s) some content, or drop the row",
        )


def _record_id(raw: Mapping[str, Any], index: int, source: str) -> str:
    value = raw.get("id")
    if value is None:
        return f"{Path(str(source)).stem}-{index}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Problem(
            f"field 'id' has type {_type_name(value)}, expected a string or an integer",
            "store 'id' as a JSON string",
        )
    return str(value)


def _convert(raw: Any, index: int, source: str) -> Record:
    if not isinstance(raw, Mapping):
        raise _Problem(
            f"the row has type {_type_name(raw)}, expected a JSON object",
            "write one JSON object per record",
        )
    fmt = _detect(raw)
    messages = _CONVERTERS[fmt](raw)
    _check_conversation(messages)
    consumed = set(_FORMAT_KEYS[fmt]) | {"id"}
    meta = {k: v for k, v in raw.items() if k not in consumed and v is not None}
    return Record(tuple(messages), fmt, _record_id(raw, index, source), meta)


def _located(source: str, index: int, line: int | None, p: _Problem) -> str:
    where = f"record {index}" + (f" (line {line})" if line is not None else "")
    return f"{source}: {where}: {p.problem}. Fix: {p.fix}"


def convert_record(raw: Mapping[str, Any], *, index: int, source: str) -> Record:
    """Convert one raw row (any supported format, detected from its keys) to a `Record`.

    ``source`` names the file (or dataset) in error messages; its stem and ``index`` make the id
    of a row without one. Raises `G2ISError` naming source, index, problem and fix.
    """
    try:
        return _convert(raw, index, source)
    except _Problem as p:
        raise G2ISError(_located(source, index, None, p)) from None


# ---------------------------------------------------------------------------------------------
# Reading files


@dataclass(frozen=True)
class _Row:
    index: int
    line: int | None  # 1-based line for JSON Lines
    raw: Any = None
    problem: _Problem | None = None  # a row that could not even be parsed
    text: bytes | None = None  # JSON Lines: the line's bytes (a leading BOM removed)


_TOO_DEEP = _Problem("JSON nested too deeply to parse", "flatten the record")


def _iter_jsonl(path: Path) -> Iterator[_Row]:
    index = 0
    with path.open("rb") as f:
        for lineno, data in enumerate(f, start=1):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                yield _Row(
                    index,
                    lineno,
                    problem=_Problem(
                        f"not valid UTF-8 ({e.reason} at byte {e.start})",
                        "save the file as UTF-8",
                    ),
                )
                index += 1
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text.removeprefix("\ufeff")
                data = data[3:]
            if not text.strip():
                continue
            try:
                yield _Row(index, lineno, raw=json.loads(text), text=data)
            except RecursionError:
                yield _Row(index, lineno, problem=_TOO_DEEP)
            except json.JSONDecodeError as e:
                yield _Row(
                    index,
                    lineno,
                    problem=_Problem(
                        f"malformed JSON at column {e.colno}: {e.msg}",
                        "make each line exactly one complete JSON object",
                    ),
                )
            index += 1


def _iter_json_array(path: Path) -> Iterator[_Row]:
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise G2ISError(f"{path}: not valid UTF-8 ({e.reason}). Fix: save it as UTF-8") from None
    try:
        rows = json.loads(text)
    except RecursionError:
        raise G2ISError(f"{path}: {_TOO_DEEP.problem}. Fix: {_TOO_DEEP.fix}") from None
    except json.JSONDecodeError as e:
        raise G2ISError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}. "
            "Fix: the file must be one JSON array of records, or JSON Lines"
        ) from None
    if not isinstance(rows, list):
        raise G2ISError(
            f"{path}: the top-level JSON value has type {_type_name(rows)}, expected an array of "
            "records. Fix: write a JSON array of objects, or one object per line (JSON Lines)"
        )
    for index, raw in enumerate(rows):
        yield _Row(index, None, raw=raw)


def _first_char(path: Path) -> str:
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(4096), b""):
            stripped = chunk.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
            if stripped:
                return stripped[0]
    return ""


def _iter_datasets(name: str, split: str, **kwargs: Any) -> Iterator[_Row]:
    import datasets  # heavy; only for Parquet, directories and hub names

    try:
        if kwargs:
            ds = datasets.load_dataset(name, split=split, **kwargs)
        else:
            ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many unrelated types
        raise G2ISError(
            f"cannot load dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Fix: pass a local .json/.jsonl/.parquet file, or check the name, split and network"
        ) from None
    for index, raw in enumerate(ds):
        yield _Row(index, None, raw=raw)


def _iter_rows(path_or_name: str | Path, split: str) -> Iterator[_Row]:
    path = Path(path_or_name)
    suffix = path.suffix.lower()
    known = suffix in _JSONL_SUFFIXES + _JSON_SUFFIXES + _PARQUET_SUFFIXES
    if path.is_dir():
        return _iter_datasets(str(path), split)
    if not path.exists():
        if known or isinstance(path_or_name, Path) or str(path_or_name).startswith((".", "/")):
            raise G2ISError(f"{path}: no such file. Fix: check the path")
        return _iter_datasets(str(path_or_name), split)
    if suffix in _JSONL_SUFFIXES:
        return _iter_jsonl(path)
    if suffix in _JSON_SUFFIXES:
        return _iter_json_array(path) if _first_char(path) == "[" else _iter_jsonl(path)
    if suffix in _PARQUET_SUFFIXES:
        return _iter_datasets("parquet", "train", data_files=str(path))
    raise G2ISError(
        f"{path}: unsupported file type {suffix or '(none)'!r}. Fix: use .jsonl, .json or .parquet"
    )


def scan_records(
    path_or_name: str | Path,
    *,
    split: str = "train",
    limit: int | None = None,
    max_problems: int | None = None,
) -> tuple[list[Record], list[str]]:
    """Read and convert every row; return the good records and one message per bad row.

    Stops reading after ``max_problems`` problems (None: read everything). Errors that concern
    the whole file (missing file, unsupported type, a JSON array that does not parse) raise
    `G2ISError`. ``split`` applies to hub names and dataset directories.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise G2ISError(f"limit must be a positive integer or None, got {limit!r}")
    source = str(path_or_name)
    records: list[Record] = []
    problems: list[str] = []
    rows = itertools.islice(_iter_rows(path_or_name, split), limit)
    for row in rows:
        try:
            if row.problem is not None:
                raise row.problem
            records.append(_convert(row.raw, row.index, source))
        except _Problem as p:
            problems.append(_located(source, row.index, row.line, p))
            if max_problems is not None and len(problems) >= max_problems:
                break
    if not records and not problems:
        path = Path(path_or_name)
        what = ("holds only blank lines" if path.is_file() and path.stat().st_size
                else "is empty")
        problems.append(f"{source}: no records: the file {what}. Fix: add records to it")
    return records, problems


def read_raw_records(path_or_name: str | Path, *, split: str = "train") -> list[bytes]:
    """Each record of a dataset as one JSON Lines line (bytes ending in a newline), in the order
    and number `load_records` reads them: JSON Lines keep their bytes unchanged (a leading
    byte-order mark removed; a final newline added where missing), rows of JSON arrays, Parquet
    files and hub datasets are serialised as compact JSON. Raises at the first row that does not
    parse, as `load_records` does. Used to write a selected subset of the pool."""
    out: list[bytes] = []
    for row in _iter_rows(path_or_name, split):
        if row.problem is not None:
            raise G2ISError(_located(str(path_or_name), row.index, row.line, row.problem))
        if row.text is not None:
            line = row.text
            out.append(line if line.endswith(b"\n") else line + b"\n")
        else:
            try:
                out.append(json.dumps(row.raw, ensure_ascii=False, default=str).encode() + b"\n")
            except (TypeError, ValueError) as e:
                raise G2ISError(f"{path_or_name}: record {row.index} cannot be written as JSON "
                                f"({e}). Fix: convert the dataset to JSON Lines") from None
    return out


def load_records(
    path_or_name: str | Path, *, split: str = "train", limit: int | None = None
) -> list[Record]:
    """Load a dataset file (JSON Lines, JSON array, Parquet) or hub name as `Record`s.

    Raises `G2ISError` at the first bad row, naming file, record (and line) and the fix.
    """
    records, problems = scan_records(path_or_name, split=split, limit=limit, max_problems=1)
    if problems:
        raise G2ISError(problems[0])
    return records


# ---------------------------------------------------------------------------------------------
# Writing


def record_to_json(record: Record) -> dict[str, Any]:
    """The JSON row for a record: prompt/completion records stay prompt/completion (they must not
    gain a chat template); all others are written in the messages format."""
    if record.format == "prompt_completion":
        (user, assistant) = record.messages
        body: dict[str, Any] = {"prompt": user.content, "completion": assistant.content}
    else:
        body = {"messages": [{"role": m.role, "content": m.content} for m in record.messages]}
    clash = set(record.meta) & (set(body) | {"id"})
    if clash:
        raise G2ISError(
            f"record {record.id}: meta keys {sorted(clash)} clash with the format's fields. "
            "Fix: rename those meta keys"
        )
    return {"id": record.id, **body, **record.meta}


def write_jsonl(records: Iterable[Record], path: str | Path) -> Path:
    """Write records as JSON Lines, atomically (a temporary file renamed into place).

    Messages-format records load back identically with `load_records`; alpaca and sharegpt
    records load back as messages-format records with the same messages, id and meta.
    """
    path = Path(path)
    lines = []
    for record in records:
        try:
            lines.append(json.dumps(record_to_json(record), ensure_ascii=False))
        except (TypeError, ValueError) as e:
            raise G2ISError(
                f"record {record.id}: meta is not JSON-serialisable ({e}). "
                "Fix: keep meta values to strings, numbers, booleans, lists and objects"
            ) from None
    with atomic_open(path, "w") as f:
        f.writelines(line + "\n" for line in lines)
    return path
