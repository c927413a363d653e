"""Loss and exact-match evaluation of a (LoRA-adapted) model on instruction records.

Scoring reuses the training loss (`batch_nll`) on the same static length buckets, one compiled
program per bucket. Generation is greedy with a KV cache: prompts are left-padded into a bucket,
one prefill call fills the cache, and a `lax.scan` emits the answer tokens; the whole decode is
one compiled program per (batch, bucket, max_new_tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2is_jax.data import Record, encode_prompt, encode_records, length_buckets, make_batches
from g2is_jax.errors import G2ISError
from g2is_jax.models.llama import KVCache, Llama
from g2is_jax.models.lora import batch_nll, split_lora
from g2is_jax.progress import progress_bar


@dataclasses.dataclass(frozen=True)
class EvalResult:
    loss: np.ndarray  # [N] mean completion-token NLL per record
    n_tokens: np.ndarray  # [N] completion tokens per record
    predictions: list[str] | None = None
    exact_match: np.ndarray | None = None  # [N] bool

    def summary(self) -> dict[str, float]:
        tok = np.maximum(self.n_tokens.sum(), 1)
        out = {
            "n": int(len(self.loss)),
            "mean_loss": float(self.loss.mean()) if len(self.loss) else float("nan"),
            "token_loss": float((self.loss * self.n_tokens).sum() / tok),
        }
        if self.exact_match is not None:
            out["exact_match"] = float(self.exact_match.mean()) if len(self.loss) else float(
                "nan")
        return out


@functools.partial(jax.jit, static_argnums=0)
def _batch_losses(graphdef, base, lora, input_ids, attention_mask, loss_mask):
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}
    return batch_nll(graphdef, lora, base, batch)


def score_records(model: Llama, tokenizer, records: Sequence[Record], *, batch_size: int = 8,
                  max_length: int = 2048, progress: bool = True) -> EvalResult:
    """Per-record completion loss (and token counts), in input order."""
    encoded, _ = encode_records(records, tokenizer, max_length=max_length, progress=False)
    batches = make_batches(encoded, batch_size=batch_size, buckets=length_buckets(max_length),
                           pad_id=pad_id(tokenizer))
    graphdef, base, lora = split_lora(model)
    loss = np.zeros(len(records), np.float64)
    ntok = np.zeros(len(records), np.int64)
    for b in progress_bar(batches, desc="scoring", unit="batch", enabled=progress):
        out = np.asarray(_batch_losses(graphdef, base, lora, b.input_ids, b.attention_mask,
                                       b.loss_mask))
        real = b.indices >= 0
        loss[b.indices[real]] = out[real]
        ntok[b.indices[real]] = b.loss_mask[real, 1:].sum(axis=1)
    return EvalResult(loss=loss, n_tokens=ntok)


def pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    if pid is None:
        raise G2ISError("the tokenizer has neither a pad nor an eos token")
    return int(pid)


def stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end an answer: eos and the chat template's end-of-turn token."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return tuple(sorted(i for i in ids if i is not None))


_FINAL = re.compile(r"####\s*(.+)$", re.MULTILINE)


def normalize_answer(text: str) -> str:
    """The text compared by exact match: what follows a final '#### ' marker (GSM8K; thousands
    separators dropped) or else the whole text; inner whitespace collapsed, a final period
    dropped. Case is kept ("true" is not "True")."""
    m = _FINAL.search(text)
    if m:
        text = m.group(1).replace(",", "")
    return " ".join(text.split()).removesuffix(".").strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _greedy(graphdef, base, lora, ids, mask, max_new: int):
    model: Llama = nnx.merge(graphdef, lora, base)
    b, lp = ids.shape
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = KVCache.zeros(model.config, b, lp + max_new, dtype=model.embed_tokens.embedding.dtype)
    logits, cache = model(ids, mask, positions=positions, cache=cache, cache_index=0)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)

    # Runs all max_new steps (static shape); the host cuts each row at its first stop token.
    def step(carry, t):
        tok, pos, cache = carry
        logits, cache = model(tok[:, None], jnp.ones((b, 1), jnp.int32), positions=pos[:, None],
                              cache=cache, cache_index=lp + t)
        nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        return (nxt, pos + 1, cache), tok

    start = (first, positions[:, -1] + 1, cache)
    _, toks = jax.lax.scan(step, start, jnp.arange(max_new, dtype=jnp.int32))
    return toks.T  # [B, max_new]


def generate(model: Llama, tokenizer, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 32, batch_size: int = 8, progress: bool = True
             ) -> list[list[int]]:
    """Greedy continuations (cut at the first stop token) of token-id prompts."""
    graphdef, base, lora = split_lora(model)
    stops = stop_ids(tokenizer)
    pid = pad_id(tokenizer)
    longest = max((len(p) for p in prompts), default=1)
    buckets = length_buckets(max(longest, 64))
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in progress_bar(chunks, desc="generating", unit="batch", enabled=progress):
        width = next(b for b in buckets if b >= max(len(prompts[i]) for i in chunk))
        ids = np.full((batch_size, width), pid, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(chunk):  # left padding: the answer starts at the same slot
            p = prompts[i]
            ids[r, width - len(p):] = p
            mask[r, width - len(p):] = 1
        mask[len(chunk):, -1] = 1  # filler rows see one token, so nothing is all-masked
        toks = np.asarray(_greedy(graphdef, base, lora, ids, mask, max_new_tokens))
        for r, i in enumerate(chunk):
            seq = toks[r].tolist()
            cut = next((j for j, t in enumerate(seq) if t in stops), len(seq))
            out[i] = seq[:cut]
    return out


def evaluate_records(model: Llama, tokenizer, records: Sequence[Record], *,
                     batch_size: int = 8, max_length: int = 2048, generate_answers: bool = False,
                     max_new_tokens: int = 32, progress: bool = True) -> EvalResult:
    """Loss per record, and with `generate_answers` greedy predictions and exact match."""
    res = score_records(model, tokenizer, records, batch_size=batch_size, max_length=max_length,
                        progress=progress)
    if not generate_answers:
        return res
    prompts = [encode_prompt(r, tokenizer).tolist() for r in records]
    toks = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                    batch_size=batch_size, progress=progress)
    preds = [tokenizer.decode(t, skip_special_tokens=True) for t in toks]
    em = np.array([exact_match(p, r.reference) for p, r in zip(preds, records)])
    return dataclasses.replace(res, predictions=preds, exact_match=em)


__all__ = ["EvalResult", "evaluate_records", "exact_match", "generate",
           "normalize_answer", "score_records"]
