"""Split a model into (graphdef, base, lora) and write its loss as a pure function of them.

Everything downstream (warmup training, per-example gradients, evaluation) works on
``loss(lora, base, example)``: the base state is an argument like any other array pytree but is
never differentiated, so gradients, optimizer state and checkpoints hold the adapters only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from g2is_jax.models.llama import Llama, example_nll

Example = Mapping[str, jax.Array]  # input_ids [L], attention_mask [L], loss_mask [L]


def split_lora(model: Llama) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, base state, lora state); `merge_lora` is its inverse."""
    graphdef, lora, base = nnx.split(model, nnx.LoRAParam, ...)
    return graphdef, base, lora


def merge_lora(graphdef: nnx.GraphDef, base: nnx.State, lora: nnx.State) -> Llama:
    return nnx.merge(graphdef, lora, base)


def batch_nll(graphdef: nnx.GraphDef, lora: nnx.State, base: nnx.State, batch: Example,
              dropout_key: jax.Array | None = None) -> jax.Array:
    """Per-row mean completion-token NLL [B] of a padded batch."""
    model = merge_lora(graphdef, base, lora)
    logits = model(batch["input_ids"], batch["attention_mask"], dropout_key=dropout_key)
    return example_nll(logits, batch["input_ids"], batch["loss_mask"])


def completion_loss(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``loss(lora, base, example, dropout_key=None) -> scalar`` for ONE unbatched example.

    The mean cross-entropy over the example's completion tokens, as LESS computes it; written
    for one example so that `jax.vmap(jax.grad(loss), in_axes=(None, None, 0))` gives
    per-example gradients.
    """

    def loss(lora: nnx.State, base: nnx.State, example: Example,
             dropout_key: jax.Array | None = None) -> jax.Array:
        batch = {k: jnp.asarray(example[k])[None] for k in
                 ("input_ids", "attention_mask", "loss_mask")}
        return batch_nll(graphdef, lora, base, batch, dropout_key)[0]

    return loss


def token_mean_loss(graphdef: nnx.GraphDef) -> Callable[..., jax.Array]:
    """``loss(lora, base, batch, dropout_key=None)``: NLL averaged over all target tokens of the
    batch (the training objective of transformers' Trainer, which LESS's warmup uses)."""

    def loss(lora, base, batch, dropout_key=None):
        model = merge_lora(graphdef, base, lora)
        logits = model(batch["input_ids"], batch["attention_mask"], dropout_key=dropout_key)
        per_row = example_nll(logits, batch["input_ids"], batch["loss_mask"])
        n_tok = jnp.sum(batch["loss_mask"][:, 1:].astype(jnp.float32), axis=-1)
        return jnp.sum(per_row * n_tok) / jnp.maximum(jnp.sum(n_tok), 1.0)

    return loss


def count_params(state: nnx.State) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(state)))
