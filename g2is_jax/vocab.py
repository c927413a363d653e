"""The typed vocabularies of the library, defined once (no heavy imports: the CLI's parsers and
the run config read them without importing JAX).

Each is a `Literal` type for annotations and a tuple of its values for checks and `choices`.
"""

from __future__ import annotations

from typing import Literal, get_args

MethodName = Literal["g2is", "g2is-robust", "g2is-abs", "less", "random", "rds"]
METHOD_NAMES: tuple[str, ...] = get_args(MethodName)
METHOD_HELP: dict[str, str] = {
    "g2is": "the authors' gradient walk (component signs by pca_sign)",
    "g2is-robust": "sign-robust walk (this project's): both poles of every component, budget "
                   "split by the validation variance on each side",
    "g2is-abs": "sign-free walk (this project's): anchor and fallback rows ranked by |T·k|",
    "less": "LESS: top rows by lr-weighted mean cosine, max over subtasks",
    "random": "a seeded uniform sample",
    "rds": "LESS scoring on representation features (T and V are hidden states)",
}

PcaSign = Literal["v-based", "u-based"]
PCA_SIGNS: tuple[str, ...] = get_args(PcaSign)

ValNormalize = Literal["unit", "raw"]
VAL_NORMALIZE: tuple[str, ...] = get_args(ValNormalize)

# The pool's features before the walk: as computed ("keep", the authors'), or with the mean
# direction of the pool's unit rows projected out of every row ("remove", this project's option).
PoolMean = Literal["keep", "remove"]
POOL_MEAN: tuple[str, ...] = get_args(PoolMean)

SignHandling = Literal["signed", "both-poles", "absolute"]
SIGN_HANDLING: tuple[str, ...] = get_args(SignHandling)

WalkMode = Literal["onthefly", "graph"]
WALK_MODES: tuple[str, ...] = get_args(WalkMode)

StorageDtype = Literal["auto", "float32", "bfloat16", "float64"]
STORAGE_DTYPES: tuple[str, ...] = get_args(StorageDtype)

# `g2is run` with several targets: the [data] pool alone (the paper's general-pool setting) or
# the pool plus the target's own training split.
PoolSetting = Literal["general", "with-target"]
POOL_SETTINGS: tuple[str, ...] = get_args(PoolSetting)

__all__ = ["METHOD_HELP", "METHOD_NAMES", "PCA_SIGNS", "POOL_MEAN", "POOL_SETTINGS",
           "SIGN_HANDLING", "STORAGE_DTYPES", "VAL_NORMALIZE", "WALK_MODES", "MethodName",
           "PcaSign", "PoolMean", "PoolSetting", "SignHandling", "StorageDtype", "ValNormalize",
           "WalkMode"]
