"""Selection from gradient features: G2IS's gradient walk and the baselines.

`g2is_select(T, V, ratio=..., delta=...)` is the whole method over arrays; the pieces are public
for composition: `core_knowledge` and `allocate_budgets` (core.py), `knn_graph` (graph.py),
`gradient_walk` (walk.py), the baselines (baselines.py) and feature-file loading (features.py).
"""

from g2is_jax.select.baselines import (
    less_scores,
    less_select,
    random_select,
    representation_select,
)
from g2is_jax.select.core import (
    CoreKnowledge,
    SelectionResult,
    allocate_budgets,
    core_knowledge,
    prepare_rows,
    total_budget,
)
from g2is_jax.select.features import (
    Features,
    checkpoint_weights,
    combine_checkpoints,
    load_checkpoints,
    load_features,
)
from g2is_jax.select.graph import KnnGraph, knn_graph, mixed_graph
from g2is_jax.select.walk import WalkOutput, g2is_select, gradient_walk

METHODS = ("g2is", "less", "random", "rds")

__all__ = [
    "METHODS",
    "CoreKnowledge",
    "Features",
    "KnnGraph",
    "SelectionResult",
    "WalkOutput",
    "allocate_budgets",
    "checkpoint_weights",
    "combine_checkpoints",
    "core_knowledge",
    "g2is_select",
    "gradient_walk",
    "knn_graph",
    "less_scores",
    "less_select",
    "load_checkpoints",
    "load_features",
    "mixed_graph",
    "prepare_rows",
    "random_select",
    "representation_select",
    "total_budget",
]
