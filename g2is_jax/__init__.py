"""g2is_jax: G2IS instruction-data selection by per-example LoRA gradients, in JAX/Flax NNX."""

__version__ = "0.1.0"

from g2is_jax.errors import G2ISError

__all__ = ["G2ISError", "__version__"]
