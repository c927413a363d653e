"""Selection from gradient features: G2IS's gradient walk, its sign-robust variants, baselines.

`g2is_select(T, V, ratio=..., delta=...)` is the whole method over arrays; it is
`select_plan` (host: checks, PCA, budgets) + `select_kernel` (device: the walk, pure, composes
under jit and vmap) + the result object (plan.py). `run_method(name, inputs, options)` runs any
registered method (methods.py: g2is, g2is-robust, g2is-abs, less, random, rds). The pieces are
public for composition: `core_knowledge` and `allocate_budgets` (core.py), `knn_graph`
(graph.py), `gradient_walk` (walk.py, on prepared rows), the baselines (baselines.py), the
diagnostics (diagnostics.py) and feature-file loading (features.py).
"""

from g2is_jax.select.baselines import (
    less_scores,
    less_select,
    random_select,
    representation_select,
)
from g2is_jax.select.core import (
    PCA_SIGNS,
    VAL_NORMALIZE,
    ComponentSummary,
    CoreKnowledge,
    SelectionResult,
    allocate_budgets,
    core_knowledge,
    prepare_rows,
    total_budget,
)
from g2is_jax.select.diagnostics import (
    diagnose,
    pool_diagnostics,
    selection_conflicts,
    walk_diagnostics,
)
from g2is_jax.select.features import (
    Features,
    checkpoint_weights,
    combine_checkpoints,
    load_checkpoints,
    load_features,
    project_out,
    remove_mean_direction,
)
from g2is_jax.select.graph import KnnGraph, knn_graph, mixed_graph
from g2is_jax.select.methods import (
    METHOD_NAMES,
    METHODS,
    SelectionInputs,
    SelectOptions,
    run_method,
)
from g2is_jax.select.plan import (
    SIGN_HANDLING,
    SelectPlan,
    WalkTrace,
    g2is_select,
    pad_to_plan,
    plan_selection,
    select_kernel,
    select_plan,
    walk_directions,
)
from g2is_jax.select.walk import WalkOutput, gradient_walk

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "PCA_SIGNS",
    "SIGN_HANDLING",
    "VAL_NORMALIZE",
    "ComponentSummary",
    "CoreKnowledge",
    "Features",
    "KnnGraph",
    "SelectOptions",
    "SelectPlan",
    "SelectionInputs",
    "SelectionResult",
    "WalkOutput",
    "WalkTrace",
    "allocate_budgets",
    "checkpoint_weights",
    "combine_checkpoints",
    "project_out",
    "remove_mean_direction",
    "core_knowledge",
    "diagnose",
    "g2is_select",
    "gradient_walk",
    "knn_graph",
    "less_scores",
    "less_select",
    "load_checkpoints",
    "load_features",
    "mixed_graph",
    "pad_to_plan",
    "plan_selection",
    "pool_diagnostics",
    "prepare_rows",
    "random_select",
    "representation_select",
    "run_method",
    "select_kernel",
    "select_plan",
    "selection_conflicts",
    "total_budget",
    "walk_diagnostics",
    "walk_directions",
]
