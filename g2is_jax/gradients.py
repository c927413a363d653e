"""Per-example LoRA gradients and LESS's gradient features, as pure functions.

The loss is written for ONE example (`g2is_jax.models.lora.completion_loss`); `jax.vmap` of
`jax.grad` over a padded batch gives every record's gradient in one compiled program, and a
padding row (all-zero masks) has loss 0 and gradient 0. Batches from `make_batches` carry the
positions of their loss tokens (``target_index`` / ``target_mask``), and the loss then runs the
LM head at those positions only (the same gradients, ~15% less arithmetic on SmolLM2).
Features, as LESS defines them:

- ``sgd``: the raw gradient g (target validation examples);
- ``adam``: the step Adam would take from the checkpoint's moments m, v (pool examples):
  m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2, feature = m' / sqrt(v' + eps)
  (no bias correction; eps inside the root);
- ``sign``: sign(g).

`feature_fn` fuses gradient, feature transform and random projection into one jitted function
per batch shape, so a batch's unprojected gradients never leave the device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from g2is_jax.errors import G2ISError
from g2is_jax.projection import flatten_per_example

GRADIENT_KINDS = ("sgd", "adam", "sign")
PyTree = Any


def per_example_grads(loss_fn: Callable[..., jax.Array]) -> Callable[..., PyTree]:
    """``grads(lora, base, batch) -> pytree`` whose leaves have a leading batch axis.

    `loss_fn(lora, base, example)` is the loss of one unbatched example; every array in `batch`
    has a leading batch axis.
    """
    return jax.vmap(jax.grad(loss_fn), in_axes=(None, None, 0))


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """Adam's first and second moments (pytrees shaped like the LoRA state) and its constants."""

    mu: PyTree
    nu: PyTree
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8


def adam_features(grads: PyTree, moments: AdamMoments) -> PyTree:
    """LESS's Adam feature m'/sqrt(v' + eps) for per-example grads (leading batch axis)."""

    def one(g, m, v):
        m_new = moments.b1 * m[None] + (1.0 - moments.b1) * g
        v_new = moments.b2 * v[None] + (1.0 - moments.b2) * g * g
        return m_new / jnp.sqrt(v_new + moments.eps)

    return jax.tree_util.tree_map(one, grads, moments.mu, moments.nu)


def gradient_features(grads: PyTree, kind: str, moments: AdamMoments | None = None) -> PyTree:
    """Apply the named feature transform ("sgd", "adam" or "sign") to per-example grads."""
    if kind == "sgd":
        return grads
    if kind == "sign":
        return jax.tree_util.tree_map(jnp.sign, grads)
    if kind == "adam":
        if moments is None:
            raise G2ISError(
                "adam features need the optimizer moments of a warmup checkpoint "
                "(pass --checkpoint), or use --gradient sgd")
        return adam_features(grads, moments)
    raise G2ISError(f"unknown gradient type {kind!r}; choose from {list(GRADIENT_KINDS)}")


def row_finite(tree: PyTree) -> jax.Array:
    """[B] bool: True where every leaf of per-example row i is finite."""
    flags = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
             for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(flags), axis=0)


def feature_fn(loss_fn: Callable[..., jax.Array], kind: str,
               project_tree: Callable[[PyTree], jax.Array] | None = None
               ) -> Callable[..., Any]:
    """A jitted ``f(lora, base, batch, moments=None) -> (features [B, d], finite [B])``.

    `project_tree` maps a per-example pytree to rows [B, d] (e.g. `Projector.apply_tree`, which
    never builds the [B, P] concatenation); None keeps the flattened rows [B, P]. `finite[i]` is
    False when row i's feature holds a NaN or Inf: callers must report, not store, such rows.
    """
    if kind not in GRADIENT_KINDS:
        raise G2ISError(f"unknown gradient type {kind!r}; choose from {list(GRADIENT_KINDS)}")
    grads_fn = per_example_grads(loss_fn)
    project_tree = project_tree or flatten_per_example

    @jax.jit
    def f(lora, base, batch, moments: AdamMoments | None = None):
        feats = gradient_features(grads_fn(lora, base, batch), kind, moments)
        return project_tree(feats), row_finite(feats)

    return f


jax.tree_util.register_dataclass(AdamMoments, data_fields=["mu", "nu"],
                                 meta_fields=["b1", "b2", "eps"])

__all__ = [
    "AdamMoments",
    "GRADIENT_KINDS",
    "adam_features",
    "feature_fn",
    "gradient_features",
    "per_example_grads",
    "row_finite",
]
