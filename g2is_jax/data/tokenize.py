"""Records to token ids with a completion-only loss mask, and static-shape batches.

Loss convention (shared with the model): logits at position t-1 predict ``input_ids[t]``; the
per-example loss is the mean cross-entropy over the positions t with ``loss_mask[t]`` true. The
mask covers each assistant turn's content tokens and the end-of-turn marker the chat template
emits right after it (e.g. ``<|im_end|>``), on every assistant turn, and nothing else: no system,
user, template-header or pad token. Position 0 is never in the mask (nothing predicts it).

How the assistant spans are found. The conversation is rendered to text with the tokenizer's
chat template (``apply_chat_template(tokenize=False)``). For each assistant turn i the template
also renders the prefix ``messages[:i]`` with the generation prompt, and ``messages[:i+1]``
without it; both must be text prefixes of the whole rendering. The first ends where turn i's
content starts; after the content, the rest of the second (less trailing whitespace, such as
ChatML's newline) is the end-of-turn marker. This needs no ``{% generation %}`` support in the
template (SmolLM2's has none) and handles templates that trim content (Llama 3). The text is then
cut at those span boundaries and each piece is tokenized on its own (special tokens in the text
are parsed as usual) and the ids concatenated. Tokenizing by pieces makes the mask exact by
construction, and it matches generation, where the model's tokens follow the tokens of the
generation prompt; it differs from tokenizing the whole string only where a BPE merge would cross
a span boundary (e.g. a reply that starts with a newline right after the header's newline).

Prompt/completion records use no template: the tokenizer's own leading special tokens (BOS, if it
adds one), the prompt, the completion and EOS; the loss covers the completion and EOS.

Truncation keeps the first ``max_length`` tokens. A record whose mask is empty after truncation
is an error naming it (never silently dropped: rows stay aligned with the input file).

Batches have static shapes: ``length_buckets`` gives a few padded lengths, and each batch is
padded to ``batch_size`` rows and to the smallest bucket that holds its longest row, so a jitted
step compiles once per bucket.

Each batch also lists where its loss tokens are (``target_index`` [B, K], ``target_mask``
[B, K]), so the loss can run the LM head only at those K positions instead of all L: completion
tokens are a small part of a record (about 12% in the synthetic pool), and the head of a small
model with a large vocabulary (SmolLM2: 49152 x 576) is a fifth of its per-token arithmetic.
K is static too, one of three values per bucket (`target_slot_count`: L/4, L/2 or L), so a
jitted step compiles at most three times per bucket.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import numpy as np

from g2is_jax.data.formats import Record
from g2is_jax.errors import G2ISError

__all__ = [
    "Batch",
    "EncodeReport",
    "Encoded",
    "encode_prompt",
    "encode_record",
    "encode_records",
    "length_buckets",
    "make_batches",
    "target_slot_count",
    "target_slots",
]


@dataclass(frozen=True, eq=False)
class Encoded:
    """One tokenized record."""

    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # bool [L]; True where input_ids[t] is predicted by the loss
    truncated: bool

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


# ---------------------------------------------------------------------------------------------
# Rendering and span finding


def _render(tokenizer: Any, conversations: list[list[dict]], record: Record, **kw: Any) -> list:
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, **kw)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError) as e:  # raise_exception(...)
        raise G2ISError(
            f"record {record.id}: the chat template rejected the conversation: {e}. "
            "Fix: make the conversation follow the model's turn rules (e.g. alternating roles)"
        ) from None


def _template_error(record: Record, what: str) -> G2ISError:
    return G2ISError(
        f"record {record.id}: cannot find the assistant spans: {what}. Fix: use a chat template "
        "that renders earlier turns unchanged as the conversation grows, or prompt/completion "
        "records (no template)"
    )


def _chat_pieces(record: Record, tokenizer: Any) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, in_loss) pieces."""
    if not getattr(tokenizer, "chat_template", None):
        raise G2ISError(
            "the tokenizer has no chat template. Fix: use a chat model's tokenizer, or "
            "prompt/completion records, which need no template"
        )
    conv = [{"role": m.role, "content": m.content} for m in record.messages]
    turns = _assistant_turns(record)
    opened = _render(tokenizer, [conv[:i] for i in turns], record, add_generation_prompt=True)
    closed = _render(tokenizer, [conv[: i + 1] for i in turns] + [conv], record)
    full = closed[-1]
    pieces: list[tuple[str, bool]] = []
    cursor = 0
    for k, i in enumerate(turns):
        before, after = opened[k], closed[k]
        if not (full.startswith(after) and after.startswith(before)) or len(before) < cursor:
            raise _template_error(record, f"the rendering of turn {i} is not a prefix")
        content = record.messages[i].content
        tail = after[len(before) :]
        if tail.startswith(content):
            start, end = len(before), len(before) + len(content)
        else:  # templates that trim the content
            j = tail.find(content.strip())
            if j < 0 or tail[:j].strip():
                raise _template_error(record, f"the template rewrites the content of turn {i}")
            start = len(before) + j
            end = start + len(content.strip())
        eot_end = end + len(after[end:].rstrip())
        pieces += [(full[cursor:start], False), (full[start:end], True), (full[end:eot_end], True)]
        cursor = eot_end
    pieces.append((full[cursor:], False))
    return pieces


def _assistant_turns(record: Record) -> list[int]:
    turns = [i for i, m in enumerate(record.messages) if m.role == "assistant"]
    if not turns:
        raise G2ISError(f"record {record.id}: no assistant turn. Fix: add the assistant's reply")
    return turns


def _leading_specials(tokenizer: Any) -> list[int]:
    """Special tokens the tokenizer puts before a text by itself (BOS for Llama tokenizers)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for j in range(len(full) - len(plain) + 1):
        if full[j : j + len(plain)] == plain:
            return list(full[:j])
    return []


def _tokenize_pieces(
    tokenizer: Any, pieces: list[tuple[str, bool]]
) -> tuple[list[int], list[bool]]:
    pieces = [(text, loss) for text, loss in pieces if text]
    encoded = tokenizer([text for text, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[bool] = []
    for (_, loss), piece_ids in zip(pieces, encoded, strict=True):
        ids += piece_ids
        mask += [loss] * len(piece_ids)
    return ids, mask


def _full_tokens(record: Record, tokenizer: Any) -> tuple[list[int], list[bool]]:
    if record.format != "prompt_completion":
        return _tokenize_pieces(tokenizer, _chat_pieces(record, tokenizer))
    if tokenizer.eos_token_id is None:
        raise G2ISError(
            "the tokenizer has no EOS token, needed to end a completion. Fix: set eos_token"
        )
    prompt, completion = (m.content for m in record.messages)
    ids, mask = _tokenize_pieces(tokenizer, [(prompt, False), (completion, True)])
    bos = _leading_specials(tokenizer)
    return bos + ids + [tokenizer.eos_token_id], [False] * len(bos) + mask + [True]


def _encode(record: Record, tokenizer: Any, max_length: int) -> tuple[Encoded, int]:
    """Encode without checking the mask; also return the untruncated length."""
    ids, mask = _full_tokens(record, tokenizer)
    n = len(ids)
    input_ids = np.asarray(ids[:max_length], dtype=np.int32)
    loss_mask = np.asarray(mask[:max_length], dtype=bool)
    if loss_mask.size:
        loss_mask[0] = False
    return Encoded(input_ids, loss_mask, truncated=n > max_length), n


def _is_count(x: Any, minimum: int = 1) -> bool:
    """An integer (Python or NumPy, not bool) of at least ``minimum``."""
    return isinstance(x, int | np.integer) and not isinstance(x, bool) and x >= minimum


def _check_max_length(max_length: int) -> None:
    if not _is_count(max_length, 2):
        raise G2ISError(f"max_length must be an integer >= 2, got {max_length!r}")


def _empty_error(ids: Sequence[str], max_length: int) -> G2ISError:
    shown = ", ".join(ids[:20]) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")
    return G2ISError(
        f"{len(ids)} record(s) have no loss tokens left after truncation to {max_length} "
        f"tokens: {shown}. Fix: raise --max-length (max_length), or shorten or drop these "
        "records' prompts"
    )


def encode_record(record: Record, tokenizer: Any, *, max_length: int = 2048) -> Encoded:
    """Tokenize one record with its loss mask (see the module docstring); `G2ISError` if no
    loss token survives truncation."""
    _check_max_length(max_length)
    encoded, _ = _encode(record, tokenizer, max_length)
    if encoded.n_loss_tokens == 0:
        raise _empty_error([record.id], max_length)
    return encoded


def encode_prompt(record: Record, tokenizer: Any) -> np.ndarray:
    """Token ids (int32) that prompt the model for the record's last assistant turn: everything
    before that turn's content, tokenized exactly as `encode_record` tokenizes it. For greedy
    generation compared with `Record.reference`."""
    last = _assistant_turns(record)[-1]
    head = Record(record.messages[: last + 1], record.format, record.id, record.meta)
    ids, mask = _full_tokens(head, tokenizer)
    start = mask.index(True) if record.format == "prompt_completion" else _last_span_start(mask)
    return np.asarray(ids[:start], dtype=np.int32)


def _last_span_start(mask: list[bool]) -> int:
    t = len(mask)
    while t > 0 and not mask[t - 1]:
        t -= 1
    while t > 0 and mask[t - 1]:
        t -= 1
    return t


@dataclass(frozen=True, eq=False)
class EncodeReport:
    """What `encode_records` did: sizes, truncations, lengths."""

    n: int
    max_length: int
    truncated_ids: tuple[str, ...]
    empty_ids: tuple[str, ...]  # no loss token after truncation (only with check=False)
    lengths: np.ndarray  # int64 [n]: token lengths before truncation
    loss_tokens: np.ndarray  # int64 [n]: loss tokens after truncation

    @property
    def n_truncated(self) -> int:
        return len(self.truncated_ids)

    def length_stats(self) -> dict[str, float]:
        """min, mean, p50, p95, max of the untruncated token lengths."""
        if self.n == 0:
            return {}
        x = self.lengths
        return {
            "min": int(x.min()),
            "mean": float(x.mean()),
            "p50": float(np.percentile(x, 50)),
            "p95": float(np.percentile(x, 95)),
            "max": int(x.max()),
        }

    def summary(self) -> str:
        """A few human-readable lines."""
        s = self.length_stats()
        mean_loss = float(self.loss_tokens.mean()) if self.n else 0.0
        lines = [
            (
                f"tokens per record: min {s.get('min', 0)}  mean {s.get('mean', 0):.1f}  "
                f"p50 {s.get('p50', 0):.0f}  p95 {s.get('p95', 0):.0f}  max {s.get('max', 0)}"
            ),
            f"loss tokens per record: mean {mean_loss:.1f}  total {int(self.loss_tokens.sum())}",
            f"truncated to {self.max_length}: {self.n_truncated} of {self.n}",
        ]
        if self.truncated_ids:
            ids = self.truncated_ids
            more = f" and {len(ids) - 10} more" if len(ids) > 10 else ""
            lines.append("  truncated ids: " + ", ".join(ids[:10]) + more)
        if self.empty_ids:
            lines.append(f"no loss tokens after truncation: {', '.join(self.empty_ids[:10])}")
        return "\n".join(lines)


def encode_records(
    records: Sequence[Record],
    tokenizer: Any,
    *,
    max_length: int = 2048,
    progress: bool = True,
    check: bool = True,
) -> tuple[list[Encoded], EncodeReport]:
    """Encode records in order (row i of the output is record i) and report on it.

    Raises `G2ISError` listing every record left with no loss token by truncation; with
    ``check=False`` those are kept and listed in ``report.empty_ids`` instead (for reports).
    A progress bar shows when ``progress`` and stderr is a terminal.
    """
    from g2is_jax.progress import progress_bar

    _check_max_length(max_length)
    encoded: list[Encoded] = []
    lengths = np.zeros(len(records), dtype=np.int64)
    bar = progress_bar(records, desc="tokenize", unit="rec", enabled=progress)
    for i, record in enumerate(bar):
        enc, lengths[i] = _encode(record, tokenizer, max_length)
        encoded.append(enc)
    empty = tuple(r.id for r, e in zip(records, encoded, strict=True) if e.n_loss_tokens == 0)
    if empty and check:
        raise _empty_error(empty, max_length)
    report = EncodeReport(
        n=len(records),
        max_length=max_length,
        truncated_ids=tuple(r.id for r, e in zip(records, encoded, strict=True) if e.truncated),
        empty_ids=empty,
        lengths=lengths,
        loss_tokens=np.array([e.n_loss_tokens for e in encoded], dtype=np.int64),
    )
    return encoded, report


# ---------------------------------------------------------------------------------------------
# Buckets and batches


def length_buckets(max_length: int, *, min_length: int = 64) -> tuple[int, ...]:
    """Padded lengths ``min_length * 2**k`` below ``max_length``, then ``max_length`` itself.

    >>> length_buckets(512)
    (64, 128, 256, 512)
    """
    for name, value in (("max_length", max_length), ("min_length", min_length)):
        if not _is_count(value):
            raise G2ISError(f"{name} must be a positive integer, got {value!r}")
    max_length, min_length = int(max_length), int(min_length)
    out = []
    b = min_length
    while b < max_length:
        out.append(b)
        b *= 2
    return (*out, max_length)


@dataclass(frozen=True, eq=False)
class Batch:
    """A padded batch with static shape [batch_size, bucket]."""

    indices: np.ndarray  # int64 [B]; row's position in the encoded list, -1 for padding rows
    input_ids: np.ndarray  # int32 [B, L], right-padded with pad_id
    attention_mask: np.ndarray  # int32 [B, L], 1 = real token
    loss_mask: np.ndarray  # float32 [B, L]
    # Where the loss tokens are (see `target_slots`); None when not computed.
    target_index: np.ndarray | None = None  # int32 [B, K]: positions t with loss_mask[t] > 0
    target_mask: np.ndarray | None = None  # float32 [B, K]: loss_mask at those t, 0 = empty slot

    @property
    def n_real(self) -> int:
        """Number of rows that are records (not padding)."""
        return int((self.indices >= 0).sum())

    def arrays(self) -> Mapping[str, np.ndarray]:
        """The model inputs as a dict (a pytree): input_ids, attention_mask, loss_mask, and
        target_index, target_mask when the batch has them."""
        out = {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "loss_mask": self.loss_mask,
        }
        if self.target_index is not None:
            out["target_index"] = self.target_index
            out["target_mask"] = self.target_mask
        return out


def target_slot_count(n_targets: int, length: int, *, min_slots: int = 8) -> int:
    """The static number K of loss-token slots for rows of `length` tokens whose largest loss-
    token count is `n_targets`: ``length // 4`` (at least ``min_slots``), doubled until it
    holds n_targets, at most ``length``. A bucket sees at most three values of K (each one a
    compiled program), and the usual batch, whose completions are short, runs the LM head at a
    quarter of its positions.

    >>> [target_slot_count(n, 64) for n in (0, 5, 16, 17, 33, 63)]
    [16, 16, 16, 32, 64, 64]
    """
    k = max(length // 4, min(int(min_slots), length), 1)
    while k < n_targets:
        k *= 2
    return min(k, length)


def target_slots(loss_mask: np.ndarray, *, min_slots: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(target_index int32 [B, K], target_mask float32 [B, K])`` of a loss mask [B, L].

    Row b's loss tokens (positions t >= 1 with ``loss_mask[b, t] > 0``, in order) fill its
    first slots: ``target_index[b, k] = t`` and ``target_mask[b, k] = loss_mask[b, t]``; the
    remaining slots hold index 0 and mask 0. K is `target_slot_count` of the largest count.
    Position 0 is skipped, as `example_nll` skips it (nothing predicts it).
    """
    loss_mask = np.asarray(loss_mask, dtype=np.float32)
    b, length = loss_mask.shape
    hit = loss_mask > 0
    hit[:, :1] = False
    counts = hit.sum(axis=1)
    k = target_slot_count(int(counts.max(initial=0)), length, min_slots=min_slots)
    index = np.zeros((b, k), dtype=np.int32)
    mask = np.zeros((b, k), dtype=np.float32)
    rows, cols = np.nonzero(hit)  # row-major: each row's positions in increasing order
    slot = np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    index[rows, slot] = cols
    mask[rows, slot] = loss_mask[rows, cols]
    return index, mask


def _collate(
    encoded: Sequence[Encoded], rows: np.ndarray, batch_size: int, length: int, pad_id: int
) -> Batch:
    indices = np.full(batch_size, -1, dtype=np.int64)
    input_ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    attention = np.zeros((batch_size, length), dtype=np.int32)
    loss = np.zeros((batch_size, length), dtype=np.float32)
    for r, i in enumerate(rows):
        e = encoded[i]
        indices[r] = i
        input_ids[r, : e.length] = e.input_ids
        attention[r, : e.length] = 1
        loss[r, : e.length] = e.loss_mask
    return Batch(indices, input_ids, attention, loss, *target_slots(loss))


def make_batches(
    encoded: Sequence[Encoded],
    *,
    batch_size: int,
    buckets: Sequence[int],
    pad_id: int,
    order: Literal["bucketed", "input"] = "bucketed",
    shuffle_seed: int | None = None,
) -> list[Batch]:
    """Group encoded rows into batches of exactly ``batch_size`` rows (padding rows: index -1,
    all-zero masks), each padded to the smallest bucket that holds its longest row.

    ``order="bucketed"``: rows grouped by bucket (fewest padded tokens), batches by bucket;
    ``order="input"``: consecutive rows in input order. ``shuffle_seed`` permutes the rows first
    (and, bucketed, the batch order). Same input and seed, same batches.
    """
    if not _is_count(batch_size):
        raise G2ISError(f"batch_size must be a positive integer, got {batch_size!r}")
    if order not in ("bucketed", "input"):
        raise G2ISError(f"order must be 'bucketed' or 'input', got {order!r}")
    if len(buckets) == 0 or not all(_is_count(b) for b in buckets):
        raise G2ISError(f"buckets must be positive integers, got {tuple(buckets)!r}")
    sizes = sorted({int(b) for b in buckets})
    if not encoded:
        return []
    lengths = np.array([e.length for e in encoded], dtype=np.int64)
    too_long = np.flatnonzero(lengths > sizes[-1])
    if too_long.size:
        raise G2ISError(
            f"{too_long.size} row(s) are longer than the largest bucket {sizes[-1]} (first: "
            f"row {too_long[0]}, {lengths[too_long[0]]} tokens). Fix: encode with max_length "
            "no larger than the largest bucket"
        )
    bucket_of = np.array([bisect.bisect_left(sizes, n) for n in lengths], dtype=np.int64)
    rng = np.random.default_rng(shuffle_seed) if shuffle_seed is not None else None
    rows = rng.permutation(len(encoded)) if rng is not None else np.arange(len(encoded))
    groups = [rows] if order == "input" else [rows[bucket_of[rows] == k] for k in range(len(sizes))]
    chunks = [g[s : s + batch_size] for g in groups for s in range(0, len(g), batch_size)]
    if rng is not None and order == "bucketed":
        chunks = [chunks[j] for j in rng.permutation(len(chunks))]
    return [
        _collate(encoded, c, batch_size, sizes[int(bucket_of[c].max())], pad_id) for c in chunks
    ]
