"""g2is_jax: G2IS instruction-data selection by per-example LoRA gradients, in JAX/Flax NNX.

The public API, one pure step per line (see README.md for the pipeline):

    model, tok = g2is_jax.load_model("smollm2-135m")
    graphdef, base, lora = g2is_jax.split_lora(model)
    loss = g2is_jax.completion_loss(graphdef)                 # (lora, base, example) -> scalar
    grads = g2is_jax.per_example_grads(loss)                  # vmap(grad) over a batch
    rows = g2is_jax.Projector("sparse", dim=8192)(g2is_jax.flatten_per_example(grads(...)))
    result = g2is_jax.g2is_select(T, V, ratio=0.01, delta=0.8)
    plan = g2is_jax.select_plan(T, V, ratio=0.01)             # host: checks, PCA, budgets
    idx = jax.jit(g2is_jax.select_kernel)(T, plan, 0.8)       # device: the walk, pure

Names are resolved lazily, so `import g2is_jax` (and the `g2is` CLI) stays cheap until a piece
is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # errors
    "G2ISError": "g2is_jax.errors",
    # model and loading
    "ModelConfig": "g2is_jax.models.config",
    "LoraConfig": "g2is_jax.models.config",
    "RopeScaling": "g2is_jax.models.config",
    "Llama": "g2is_jax.models.llama",
    "init_model": "g2is_jax.models.llama",
    "build_model": "g2is_jax.models.llama",
    "with_lora": "g2is_jax.models.llama",
    "split_lora": "g2is_jax.models.lora",
    "merge_lora": "g2is_jax.models.lora",
    "completion_loss": "g2is_jax.models.lora",
    "load_model": "g2is_jax.models.loading",
    "load_tokenizer": "g2is_jax.models.loading",
    "load_config": "g2is_jax.models.loading",
    "save_hf_checkpoint": "g2is_jax.models.loading",
    "load_peft_adapter": "g2is_jax.models.peft",
    "save_peft_adapter": "g2is_jax.models.peft",
    # data
    "Record": "g2is_jax.data",
    "Message": "g2is_jax.data",
    "load_records": "g2is_jax.data",
    "write_jsonl": "g2is_jax.data",
    "encode_records": "g2is_jax.data",
    "make_batches": "g2is_jax.data",
    "length_buckets": "g2is_jax.data",
    "build_pool": "g2is_jax.data",
    "build_target": "g2is_jax.data",
    "suite": "g2is_jax.data",
    # training
    "TrainConfig": "g2is_jax.train",
    "TRAIN_PRESETS": "g2is_jax.train",
    "train_lora": "g2is_jax.train",
    "resolve_train_config": "g2is_jax.train",
    "load_checkpoint": "g2is_jax.train",
    # gradients, projection, store
    "AdamMoments": "g2is_jax.gradients",
    "per_example_grads": "g2is_jax.gradients",
    "adam_features": "g2is_jax.gradients",
    "gradient_features": "g2is_jax.gradients",
    "feature_fn": "g2is_jax.gradients",
    "Projector": "g2is_jax.projection",
    "project": "g2is_jax.projection",
    "flatten_per_example": "g2is_jax.projection",
    "open_store": "g2is_jax.store",
    "load_features": "g2is_jax.store",
    "read_features": "g2is_jax.store",
    "write_features": "g2is_jax.store",
    "FeatureSet": "g2is_jax.store",
    "FeatureMeta": "g2is_jax.store",
    "model_fingerprint": "g2is_jax.fingerprint",
    "compute_features": "g2is_jax.featurize",
    # selection
    "g2is_select": "g2is_jax.select",
    "select_plan": "g2is_jax.select",
    "select_kernel": "g2is_jax.select",
    "pad_to_plan": "g2is_jax.select",
    "SelectPlan": "g2is_jax.select",
    "SelectionResult": "g2is_jax.select",
    "run_method": "g2is_jax.select",
    "SelectionInputs": "g2is_jax.select",
    "SelectOptions": "g2is_jax.select",
    "METHODS": "g2is_jax.select",
    "pool_diagnostics": "g2is_jax.select",
    "remove_mean_direction": "g2is_jax.select",
    "project_out": "g2is_jax.select",
    "diagnose": "g2is_jax.select",
    "core_knowledge": "g2is_jax.select",
    "allocate_budgets": "g2is_jax.select",
    "gradient_walk": "g2is_jax.select",
    "knn_graph": "g2is_jax.select",
    "less_select": "g2is_jax.select",
    "random_select": "g2is_jax.select",
    "representation_select": "g2is_jax.select",
    # evaluation
    "evaluate_records": "g2is_jax.evaluate",
    "exact_match": "g2is_jax.evaluate",
    # scaling out over a device mesh and several processes
    "parse_mesh": "g2is_jax.sharding",
    "make_mesh": "g2is_jax.sharding",
    "initialize_distributed": "g2is_jax.sharding",
    "memory_plan": "g2is_jax.memory",
    "MemoryPlan": "g2is_jax.memory",
    "merge_shards": "g2is_jax.store",
    # the whole pipeline, its report and plots
    "RunConfig": "g2is_jax.runconfig",
    "load_run_config": "g2is_jax.runconfig",
    "run_pipeline": "g2is_jax.pipeline",
    "demo_config": "g2is_jax.demo",
    "selection_quality": "g2is_jax.report",
    "layout_2d": "g2is_jax.plots",
    "plot_metric": "g2is_jax.plots",
    "plot_walk": "g2is_jax.plots",
    "plot_budgets": "g2is_jax.plots",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'g2is_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
