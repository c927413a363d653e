"""The configuration of `g2is run`: frozen dataclasses read from TOML or YAML, with overrides.

A run file has a top-level `model`, `max_length` and `dtype` and one table per stage; every key
is optional and every unknown key is an error that names the valid ones::

    model = "smollm2-135m"
    max_length = 128
    dtype = "float32"       # or "bfloat16": weights and compute of every stage that runs the
                            # model (warmup, features, fine-tune, evaluation); one model is
                            # loaded for the whole run, so the dtype is the run's, not a stage's

    [suite]                 # the synthetic suite, written into the run directory ...
    n_pool = 800
    target = "arithmetic"

    [data]                  # ... or files (paths relative to the config file)
    pool = "pool.jsonl"
    dev = "target.dev.jsonl"
    test = "target.test.jsonl"

    [[targets]]             # ... or several targets selecting from one [data] pool
    name = "gsm8k"
    dev = "gsm8k.dev.jsonl"
    test = "gsm8k.test.jsonl"
    train = "gsm8k.train.jsonl"   # optional: the target's own training split

    [warmup]                # a TRAIN_PRESETS name plus overrides
    preset = "cpu"
    fraction = 0.1

    [features]
    projection = "sparse"
    dim = 8192
    dtype = "float32"       # the stored features: "bfloat16" halves the store and the walk's reads

    [select]
    methods = ["g2is", "g2is-robust", "less", "random"]
    ratios = [0.01]
    seeds = [0]
    pools = ["general", "with-target"]   # with several targets
    pca_sign = "v-based"
    val_normalize = "unit"
    pool_mean = "keep"                   # walks: "remove" projects out the pool's mean direction

    [finetune]
    preset = "cpu-finetune"

    [evaluate]
    generate = true

Overrides use dotted keys (`select.ratios=0.01,0.05`, `warmup.epochs=2`, `model=...`); list
values are comma-separated.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from g2is_jax.errors import G2ISError
from g2is_jax.vocab import METHOD_NAMES, POOL_SETTINGS

# The selection methods of `g2is run`: the registry's gradient-feature methods (rds needs
# representation features) plus "full" (fine-tune on the whole pool, a reference point).
METHODS = (*(m for m in METHOD_NAMES if m != "rds"), "full")
CHECKPOINT_CHOICES = ("last", "all")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """The synthetic suite (`g2is_jax.data.suite`), written to RUN/data."""

    n_pool: int = 800
    target: str = "arithmetic"
    target_share: float = 0.1
    n_dev: int = 16
    n_test: int = 50
    system: str | None = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Files: the pool, the target's validation examples and the target's test examples."""

    pool: str | None = None
    dev: str | None = None
    test: str | None = None
    target_domain: str | None = None  # meta["domain"] of pool records that are target data


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """One target of a multi-target run: its validation and test files, optionally its own
    training split (added to the pool in the "with-target" setting)."""

    name: str
    dev: str
    test: str
    train: str | None = None
    domain: str | None = None  # meta["domain"] of its records in the pool (default: name)
    max_new_tokens: int | None = None  # generation length for exact match (default: evaluate's)

    @property
    def label(self) -> str:
        return self.domain or self.name


@dataclasses.dataclass(frozen=True)
class TrainSection:
    """A `TRAIN_PRESETS` name and the fields to override (None keeps the preset's); resolved by
    `g2is_jax.train.resolve_train_config`, as `g2is warmup` and `g2is train` resolve their flags
    (a `lora_rank` without `lora_alpha` keeps the preset's alpha/rank scaling)."""

    preset: str = "cpu"
    fraction: float | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    schedule: str | None = None
    warmup_ratio: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    grad_accum: int | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_targets: str | None = None  # comma-separated: q,k,v,o,gate,up,down
    seed: int = 0

    def train_config(self, max_length: int, *, seed: int | None = None, fraction: float | None
                     = None):
        from g2is_jax.train import resolve_train_config

        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "preset"}
        fields["seed"] = self.seed if seed is None else seed
        if fraction is not None:
            fields["fraction"] = fraction
        return resolve_train_config(self.preset, max_length=max_length, **fields)


def _finetune_default() -> TrainSection:
    return TrainSection(preset="cpu-finetune")


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    projection: str = "sparse"
    dim: int = 8192
    seed: int = 0
    batch_size: int = 8
    checkpoints: str = "last"  # "last" or "all" warmup epochs
    dtype: str = "float32"  # the stored rows ("float32" or "bfloat16"), not the compute


@dataclasses.dataclass(frozen=True)
class SelectConfig:
    """Methods, budgets and seeds to compare, and the selection options (`SelectOptions`)."""

    methods: tuple[str, ...] = ("g2is", "less", "random")
    ratios: tuple[float, ...] = (0.01,)
    seeds: tuple[int, ...] = (0,)
    pools: tuple[str, ...] = ("general",)
    delta: float = 0.8
    pca_variance: float = 0.5
    n_components: int | None = None
    neighbors: int = 100
    pca_sign: str = "v-based"
    val_normalize: str = "unit"
    pool_mean: str = "keep"  # "remove": the pool's mean direction projected out (walks only)
    mode: str = "onthefly"
    diagnostics: bool = True
    mesh: str | None = None  # e.g. "data=8": the walk's rows over this process's devices

    def options(self, ratio: float, seed: int):
        """The `SelectOptions` of one selection."""
        from g2is_jax.select.methods import SelectOptions

        return SelectOptions(ratio=ratio, seed=seed, delta=self.delta,
                             pca_variance=self.pca_variance, n_components=self.n_components,
                             neighbors=self.neighbors, pca_sign=self.pca_sign,
                             val_normalize=self.val_normalize, pool_mean=self.pool_mean,
                             mode=self.mode,
                             diagnostics=self.diagnostics)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    generate: bool = True
    max_new_tokens: int = 16
    batch_size: int = 8
    base: bool = True  # also evaluate the model without fine-tuning


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: str = "smollm2-135m"
    max_length: int = 128
    dtype: str = "float32"  # the model's weights and compute, for every stage (one model)
    suite: SuiteConfig | None = None
    data: DataConfig = DataConfig()
    warmup: TrainSection = TrainSection()
    features: FeaturesConfig = FeaturesConfig()
    select: SelectConfig = SelectConfig()
    finetune: TrainSection = dataclasses.field(default_factory=_finetune_default)
    evaluate: EvalConfig = EvalConfig()
    targets: tuple[TargetConfig, ...] = ()

    def __post_init__(self):
        check_config(self)

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @property
    def target_domain(self) -> str | None:
        if self.data.target_domain is not None:
            return self.data.target_domain
        return self.suite.target if self.suite is not None else None


_SECTIONS = {"suite": SuiteConfig, "data": DataConfig, "warmup": TrainSection,
             "features": FeaturesConfig, "select": SelectConfig, "finetune": TrainSection,
             "evaluate": EvalConfig}


def check_config(cfg: RunConfig) -> None:
    """Raise a G2ISError for values no stage could run with."""
    if cfg.targets:
        if cfg.suite is not None or not cfg.data.pool or cfg.data.dev or cfg.data.test:
            raise G2ISError("with [[targets]], give the pool as [data] pool (no [suite], no "
                            "[data] dev/test: each target has its own)")
        names = [t.name for t in cfg.targets]
        if len(set(names)) != len(names) or not all(n and "/" not in n for n in names):
            raise G2ISError(f"target names must be distinct and non-empty, without '/': {names}")
    elif cfg.suite is None and not (cfg.data.pool and cfg.data.dev and cfg.data.test):
        raise G2ISError("the run needs data: a [suite] table, or [data] with pool, dev and test "
                        "files, or [data] pool with [[targets]]")
    if cfg.suite is not None and (cfg.data.pool or cfg.data.dev or cfg.data.test):
        raise G2ISError("give either [suite] or [data] files, not both")
    bad_pools = [p for p in cfg.select.pools if p not in POOL_SETTINGS]
    if bad_pools or not cfg.select.pools or len(set(cfg.select.pools)) != len(cfg.select.pools):
        raise G2ISError(f"select.pools must be distinct values of {', '.join(POOL_SETTINGS)}, "
                        f"got {list(cfg.select.pools)}")
    if "with-target" in cfg.select.pools:
        missing = [t.name for t in cfg.targets if not t.train]
        if not cfg.targets or missing:
            raise G2ISError("select.pools 'with-target' needs [[targets]] with a train file "
                            f"each (missing: {missing or 'no [[targets]]'})")
    bad = [m for m in cfg.select.methods if m not in METHODS]
    if bad or not cfg.select.methods:
        raise G2ISError(f"unknown methods {bad or '(none)'}; choose from {', '.join(METHODS)}")
    if len(set(cfg.select.methods)) != len(cfg.select.methods):
        raise G2ISError(f"methods repeat: {list(cfg.select.methods)}")
    for r in cfg.select.ratios:
        if not 0.0 < r <= 1.0:
            raise G2ISError(f"ratios must be in (0, 1], got {r}")
    if not cfg.select.ratios or not cfg.select.seeds:
        raise G2ISError("select.ratios and select.seeds need at least one value each")
    if cfg.features.checkpoints not in CHECKPOINT_CHOICES:
        raise G2ISError(f"features.checkpoints must be one of {CHECKPOINT_CHOICES}, got "
                        f"{cfg.features.checkpoints!r}")
    if cfg.max_length < 8:
        raise G2ISError(f"max_length must be ≥ 8, got {cfg.max_length}")
    for where, value in (("dtype", cfg.dtype), ("features.dtype", cfg.features.dtype)):
        if value not in DTYPES:
            raise G2ISError(f"{where} must be one of {', '.join(DTYPES)}, got {value!r}")
    for name in ("dim", "batch_size"):
        if getattr(cfg.features, name) < 1:
            raise G2ISError(f"features.{name} must be ≥ 1")
    try:  # the selection options, as every selection will check them
        cfg.select.options(cfg.select.ratios[0], 0)
    except G2ISError as exc:
        where = f"select.{exc.param}: " if exc.param else "[select] "
        raise G2ISError(f"{where}{exc}") from None

    for name in ("warmup", "finetune"):  # resolved now, so a bad value fails before any stage
        try:
            getattr(cfg, name).train_config(cfg.max_length)
        except G2ISError as e:
            raise G2ISError(f"[{name}] {e}") from None


def _convert(value: Any, annotation: str, where: str) -> Any:
    """Cast a TOML/YAML/command-line value to a field's annotated type."""
    optional = annotation.endswith(" | None")
    kind = annotation.removesuffix(" | None")
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
        if optional:
            return None
        raise G2ISError(f"{where} cannot be empty")
    try:
        if kind.startswith("tuple["):
            item = kind[len("tuple["):].split(",")[0]
            if isinstance(value, str):
                value = [v for v in (p.strip() for p in value.split(",")) if v]
            elif not isinstance(value, Sequence):
                value = [value]
            return tuple(_convert(v, item, where) for v in value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0",
                                                             "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError(value)
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind == "str":
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
    except (TypeError, ValueError):
        raise G2ISError(f"{where}: expected {annotation}, got {value!r}") from None
    raise G2ISError(f"{where}: unsupported field type {annotation}")  # pragma: no cover


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    if not isinstance(values, Mapping):
        raise G2ISError(f"[{where}] must be a table of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise G2ISError(f"unknown key(s) {unknown} in [{where}]; valid keys: "
                        f"{', '.join(fields)}")
    return cls(**{k: _convert(v, fields[k].type, f"{where}.{k}") for k, v in values.items()})


def _targets(value: Any, base_dir: str | Path | None) -> tuple[TargetConfig, ...]:
    if isinstance(value, Mapping) or not isinstance(value, Sequence) or isinstance(value, str):
        raise G2ISError("targets must be a list of tables ([[targets]] in TOML)")
    out = []
    for i, item in enumerate(value):
        t = _build(TargetConfig, item, f"targets[{i}]")
        if base_dir is not None:
            t = dataclasses.replace(t, **{k: str((Path(base_dir) / v).resolve()) for k in
                                          ("dev", "test", "train")
                                          if (v := getattr(t, k)) is not None})
        out.append(t)
    return tuple(out)


def config_from_mapping(doc: Mapping[str, Any], *, base_dir: str | Path | None = None
                        ) -> RunConfig:
    """A RunConfig from a parsed TOML/YAML document; data paths resolved against base_dir."""
    if not isinstance(doc, Mapping):
        raise G2ISError("a run config must be a table (mapping) at the top level")
    top = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(doc) - set(top))
    if unknown:
        raise G2ISError(f"unknown key(s) {unknown} in the run config; valid keys: "
                        f"{', '.join(top)}")
    kwargs: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "targets":
            kwargs[key] = _targets(value, base_dir)
        elif key in _SECTIONS:
            kwargs[key] = None if value is None else _build(_SECTIONS[key], value, key)
        else:
            kwargs[key] = _convert(value, top[key].type, key)
    if base_dir is not None and kwargs.get("data") is not None:
        data = kwargs["data"]
        kwargs["data"] = dataclasses.replace(data, **{
            k: str((Path(base_dir) / v).resolve()) for k in ("pool", "dev", "test")
            if (v := getattr(data, k)) is not None})
    return RunConfig(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a .toml, .yaml or .yml run file into a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise G2ISError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
            return {} if doc is None else doc
    except (tomllib.TOMLDecodeError, ValueError) as exc:
        raise G2ISError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        if type(exc).__module__.startswith("yaml"):
            raise G2ISError(f"{path} is not valid YAML: {exc}") from None
        raise
    raise G2ISError(f"config file {path}: use a .toml, .yaml or .yml file")


def apply_overrides(doc: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """`doc` with dotted `key=value` overrides applied (values are cast later, per field)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in doc.items()}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise G2ISError(f"override {item!r} is not KEY=VALUE (e.g. select.ratios=0.01,0.05)")
        parts = key.strip().split(".")
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 2:
            section = out.get(parts[0])
            out[parts[0]] = {**(section or {}), parts[1]: value}
        else:
            raise G2ISError(f"override key {key!r} has more than one dot")
    return out


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The RunConfig of a TOML/YAML file (or the defaults when path is None) plus overrides."""
    doc = read_config_file(path) if path is not None else {}
    data = doc.get("data")
    if path is not None and isinstance(data, Mapping):  # file paths: relative to the file
        doc = {**doc, "data": {k: str((Path(path).parent / v).resolve())
                               if k in ("pool", "dev", "test") and isinstance(v, str) else v
                               for k, v in data.items()}}
    targets = doc.get("targets")
    if path is not None and isinstance(targets, Sequence) and not isinstance(targets, str):
        doc = {**doc, "targets": [
            {k: str((Path(path).parent / v).resolve())
             if k in ("dev", "test", "train") and isinstance(v, str) else v
             for k, v in t.items()} if isinstance(t, Mapping) else t for t in targets]}
    # Paths given as overrides are relative to the working directory.
    return config_from_mapping(apply_overrides(doc, overrides), base_dir=Path.cwd())


__all__ = ["METHODS", "POOL_SETTINGS", "DataConfig", "EvalConfig", "FeaturesConfig",
           "RunConfig", "SelectConfig", "SuiteConfig", "TargetConfig", "TrainSection",
           "apply_overrides",
           "config_from_mapping", "load_run_config", "read_config_file"]
