"""Split a model into (graphdef, base, lora) and write its loss as a pure function of them.

Everything downstream (warmup training, per-example gradients, evaluation) works on
``loss(lora, base, example)``: the base state is an argument like any other array pytree but is
never differentiated, so gradients, optimizer state and checkpoints hold the adapters only.

The LoRA state has one leaf per adapted projection and factor, stacked over layers
(``layers.self_attn.q_proj.lora_a`` is [L, in, r]). Its leaves are ordered as
`jax.tree_util.tree_leaves` orders them (keys sorted at every level: ``mlp`` before
``self_attn``; ``down_proj``, ``gate_proj``, ``up_proj``; ``k_proj``, ``o_proj``, ``q_proj``,
``v_proj``; ``lora_a`` before ``lora_b``), so a per-example gradient flattened by
`g2is_jax.projection.flatten_per_example` is projection-major: for each (projection, factor) in
that order, layer 0's block, then layer 1's, ... (`LORA_FLAT_ORDER`). The order is fixed by the
structure alone; a test pins it.

A batch (or example) that carries ``target_index`` / ``target_mask`` (`make_batches` adds them,
see `g2is_jax.data.tokenize.target_slots`) runs the LM head only at its K loss positions; one
without them runs it at every position. Both give the same loss: the mean NLL of the completion
tokens. The first is the fast path for per-example gradients, where only ~12% of the tokens are
completion tokens and the head is a fifth of a small model's arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from g2is_jax.models.llama import Llama, example_nll, target_hidden, target_nll

# input_ids [L], attention_mask [L], loss_mask [L]; optionally target_index [K], target_mask [K]
Example = Mapping[str, jax.Array]
EXAMPLE_KEYS = ("input_ids", "attention_mask", "loss_mask", "target_index", "target_mask")


LORA_FLAT_ORDER = "stacked-v1"  # the column order above; feature stores record it


def split_lora(model: Llama) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, base state, lora state); `merge_lora` is its inverse."""
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, base, lora


def merge_lora(graphdef: nnx.GraphDef, base: nnx.State, lora: nnx.State) -> Llama:
    return nnx.merge(graphdef, lora, base)


def batch_nll(graphdef: nnx.GraphDef, lora: nnx.State, base: nnx.State, batch: Example,
              dropout_key: jax.Array | None = None) -> jax.Array:
    """Per-row mean completion-token NLL [B] of a padded batch (the LM head at the batch's
    ``target_index`` positions when it has them, else at every position)."""
    return _nll_and_count(merge_lora(graphdef, base, lora), batch, dropout_key)[0]


def _nll_and_count(model: Llama, batch: Example, dropout_key: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array]:
    """Per-row mean NLL [B] and per-row loss weight (token count) [B]."""
    ids = batch["input_ids"]
    if "target_index" in batch:
        hidden, _ = model.hidden_states(ids, batch["attention_mask"], dropout_key=dropout_key)
        index, mask = batch["target_index"], batch["target_mask"]
        logits = model.logits(target_hidden(hidden, index))
        return target_nll(logits, ids, index, mask), jnp.sum(mask.astype(jnp.float32), axis=-1)
    logits = model(ids, batch["attention_mask"], dropout_key=dropout_key)
    n_tok = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1)
    return example_nll(logits, ids, batch["loss_mask"]), n_tok


def completion_loss(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``loss(lora, base, example, dropout_key=None) -> scalar`` for ONE unbatched example.

    The mean cross-entropy over the example's completion tokens, as LESS computes it; written
    for one example so that `jax.vmap(jax.grad(loss), in_axes=(None, None, 0))` gives
    per-example gradients. An example with ``target_index`` / ``target_mask`` [K] runs the LM
    head at those K positions only (same loss, less arithmetic).
    """

    def loss(lora: nnx.State, base: nnx.State, example: Example,
             dropout_key: jax.Array | None = None) -> jax.Array:
        batch = {k: jnp.asarray(example[k])[None] for k in EXAMPLE_KEYS if k in example}
        return batch_nll(graphdef, lora, base, batch, dropout_key)[0]

    return loss


def token_mean_loss(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``loss(lora, base, batch, dropout_key=None)``: NLL averaged over all target tokens of the
    batch (the training objective of transformers' Trainer, which LESS's warmup uses)."""

    def loss(lora, base, batch, dropout_key=None):
        per_row, n_tok = _nll_and_count(merge_lora(graphdef, base, lora), batch, dropout_key)
        return jnp.sum(per_row * n_tok) / jnp.maximum(jnp.sum(n_tok), 1.0)

    return loss


def count_params(state: nnx.State) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(state)))
