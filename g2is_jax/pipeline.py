"""`g2is run`: the whole pipeline in one run directory, every stage cached and resumable.

Stages and where they write (RUN = the run directory; SCOPE is empty for a run with one target,
`<target>/<pool setting>/` with [[targets]]):

  data       RUN/data/                 the synthetic suite (only with a [suite] table)
  warmup     RUN/warmup/               LoRA warmup on a sample of the pool, a checkpoint per epoch
  features   RUN/features/epoch-E/ROLE Adam features of the pool ("pool") and of each target's
                                       training split ("train-<target>"), SGD features of the
                                       target's validation examples ("dev" / "dev-<target>")
  select     RUN/select/SCOPE/LABEL/   selection.json and selected.jsonl per method and ratio
                                       (and seed, for random), from the one method registry
  finetune   RUN/finetune/SCOPE/LABEL-sS/  LoRA fine-tune on the selection (PEFT export in peft/)
  evaluate   RUN/eval/SCOPE/LABEL-sS.json  target-test loss and exact match (and base.json)
  report     RUN/report.{md,json}, RUN/plots/*.png

Several targets ([[targets]]) select from one pool: the warm-up trains on a sample of the [data]
pool only, so both pool settings share it; the pool's features are computed once. In the
"with-target" setting a target's pool is the [data] pool plus its own training split.

A fine-tune depends on the *set* of selected records, not on the order they were chosen in: it
trains on them in pool order, and two selections of the same set with the same seed share one
fine-tune and evaluation (the report says "same set as ...").

Caching: a stage directory holds `stage.json` with a fingerprint of everything its output depends
on (its config section, the hashes of its input files and the fingerprints of the stages it
reads). A stage whose fingerprint matches and whose status is `done` is skipped. One that matches
but is not done (the process died) is re-entered, and the stage resumes itself: training from
its last epoch checkpoint, features from the journaled store. A stage whose inputs changed is
deleted and recomputed, and so, through the fingerprints, is everything downstream of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from g2is_jax.errors import G2ISError
from g2is_jax.runconfig import RunConfig, TargetConfig

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def fingerprint(inputs: Any) -> str:
    """A short stable hash of a JSON-able description of a stage's inputs."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: Path, doc: Any) -> None:
    from g2is_jax.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, doc)


@dataclasses.dataclass
class Stage:
    name: str
    path: Path
    fingerprint: str
    cached: bool
    seconds: float


class Runner:
    """Runs stages in RUN; records what ran and what was reused. `read_only` only reuses: a
    stage that is not finished with the same inputs is an error, and nothing is written."""

    def __init__(self, root: Path, *, echo: bool = True, read_only: bool = False):
        self.root = root
        self.echo = echo
        self.read_only = read_only
        self.stages: list[Stage] = []

    def stage(self, name: str, path: Path, inputs: dict[str, Any],
              fn: Callable[[Path], None]) -> Stage:
        fp = fingerprint(inputs)
        is_file = path.name.endswith(".json")  # else a directory (labels hold dots: r0.05)
        marker = path.with_name(path.name[:-5] + ".stage.json") if is_file else path / STAGE_FILE
        old = json.loads(marker.read_text()) if marker.exists() else None
        if old is not None and old.get("fingerprint") == fp and old.get("status") == "done":
            self._say(f"{name}: cached")
            st = Stage(name, path, fp, True, float(old.get("seconds", 0.0)))
            self.stages.append(st)
            return st
        if self.read_only:
            state = "missing" if old is None else (
                "unfinished" if old.get("fingerprint") == fp else "made from other inputs")
            raise G2ISError(f"stage {name!r} in {self.root} is {state}; finish the run with the "
                            "same config and code first")
        if old is not None and old.get("fingerprint") != fp:
            self._say(f"{name}: inputs changed, recomputing")
            _remove(path)
            marker.unlink(missing_ok=True)
        elif old is None and path.exists() and not is_file:
            # Output without a marker: not ours to trust (or a crash before the marker).
            _remove(path)
        elif old is not None:
            self._say(f"{name}: resuming an unfinished run")
        if old is None or old.get("fingerprint") != fp:
            self._say(name)
        if not is_file:
            path.mkdir(parents=True, exist_ok=True)
        _write_json(marker, {"name": name, "fingerprint": fp, "status": "running",
                             "inputs": inputs})
        t0 = time.perf_counter()
        fn(path)
        seconds = time.perf_counter() - t0
        _write_json(marker, {"name": name, "fingerprint": fp, "status": "done",
                             "seconds": round(seconds, 2), "inputs": inputs})
        st = Stage(name, path, fp, False, seconds)
        self.stages.append(st)
        return st

    def _say(self, text: str) -> None:
        if self.echo:
            print(f"[g2is run] {text}", flush=True)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _sha(path: str | Path) -> str:
    from g2is_jax.store import file_sha256

    return file_sha256(path)


def selection_label(method: str, ratio: float, seed: int) -> str:
    """RUN/select/SCOPE/<label>: the walks and less do not depend on the seed; random does; full
    is all."""
    if method == "full":
        return "full"
    base = f"{method}-r{ratio:g}"
    return f"{base}-s{seed}" if method == "random" else base


def run_label(method: str, ratio: float, seed: int) -> str:
    """RUN/finetune/SCOPE/<label> and RUN/eval/SCOPE/<label>.json: a selection trained with one
    seed."""
    if method == "full":
        return f"full-s{seed}"
    return f"{method}-r{ratio:g}-s{seed}"


def machine_info() -> dict[str, Any]:
    import os

    import jax

    devices = jax.devices()
    return {"platform": platform.platform(), "processor": platform.processor() or
            platform.machine(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": f"{len(devices)} x {devices[0].device_kind}"}


@dataclasses.dataclass(frozen=True)
class Scope:
    """One target in one pool setting: where its selections, fine-tunes and evaluations go."""

    target: str  # the target's name ("" for a run with one target)
    pool: str  # "general" or "with-target"
    prefix: str  # "" or "<target>/<pool>/"
    domain: str | None  # meta["domain"] of the target's pool records, for selection quality

    def path(self, root: Path, stage: str, label: str) -> Path:
        return root / stage / self.prefix / label if self.prefix else root / stage / label

    def name(self, label: str) -> str:
        return f"{self.prefix}{label}"


class _Features:
    """Each feature set opened and checked once per run (memory-mapped), and the combined
    arrays the methods take, built once per scope."""

    def __init__(self):
        self._sets: dict[Path, Any] = {}
        self.loads = 0

    def get(self, path: Path, role: str):
        if path not in self._sets:
            from g2is_jax.select.features import load_features

            self._sets[path] = load_features(path, role=role)
            self.loads += 1
        return self._sets[path]


def run_pipeline(cfg: RunConfig, out: str | Path, *, progress: bool = True,
                 echo: bool = True) -> dict[str, Any]:
    """Run (or resume) the pipeline of `cfg` in `out`; returns the report (also on disk)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _check_run_dir(root, cfg)
    return _Pipeline(cfg, root, progress=progress, echo=echo).run()


def report_finished(cfg: RunConfig, out: str | Path, report_to: str | Path, *,
                    echo: bool = False) -> dict[str, Any]:
    """The report of `cfg` from the finished stages in `out`, written to `report_to` (md, JSON,
    plots); nothing in `out` is written, and a stage that is missing, unfinished or made from
    other inputs is a G2ISError. For a subset of a run (fewer targets, pool settings, methods
    or seeds: every stage keeps its fingerprint) or a run that was stopped part way."""
    root = Path(out)
    if not (root / "run_config.json").is_file():
        raise G2ISError(f"{root} is not a g2is run folder (no run_config.json)")
    if Path(report_to).resolve() == root.resolve():
        raise G2ISError(f"report_to must be another folder than the run {root}: its own "
                        "report.md belongs to the run")
    return _Pipeline(cfg, root, progress=False, echo=echo, read_only=True,
                     report_to=Path(report_to)).run()


class _Pipeline:
    def __init__(self, cfg: RunConfig, root: Path, *, progress: bool, echo: bool,
                 read_only: bool = False, report_to: Path | None = None):
        self.cfg, self.root, self.progress, self.echo = cfg, root, progress, echo
        self.read_only = read_only
        self.report_to = report_to or (None if read_only else root)
        self.runner = Runner(root, echo=echo, read_only=read_only)
        self.features = _Features()
        self._model: Any = None
        self.t_start = time.perf_counter()
        from g2is_jax.fingerprint import model_fingerprint

        # The model's content (weights, config, tokenizer files), not its path text: every
        # stage that reads the model depends on it (g2is_jax.fingerprint).
        self.model_fp = model_fingerprint(cfg.model)
        # What the model computes with, for the stages that run it. Absent for float32 (and a
        # float32 feature store likewise), so run directories made before the option keep their
        # cached stages.
        self.model_inputs = {"model_fingerprint": self.model_fp,
                             **({"dtype": cfg.dtype} if cfg.dtype != "float32" else {})}

    # -- shared resources ----------------------------------------------------------------------

    def base_model(self):
        if self._model is None:
            from g2is_jax.models.loading import load_model

            self._model = load_model(self.cfg.model, dtype=self.cfg.dtype)
        return self._model

    # -- the stages ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.load_data()
        self.warmup()
        self.compute_features()
        scopes = self.scopes()
        results: list[dict[str, Any]] = []
        selections: dict[str, Any] = {}
        trained: dict[str, dict[str, Any]] = {}  # fine-tune fingerprint -> its result row
        for target in self.targets:
            if cfg.evaluate.base:
                results.append(self.evaluate_base(target))
        for scope in scopes:
            for method, ratio, seed in self.plans():
                label = selection_label(method, ratio, seed)
                if method != "full" and scope.name(label) not in selections:
                    selections[scope.name(label)] = self.select(scope, method, ratio, seed)
                results.append(self.finetune_and_evaluate(scope, method, ratio, seed,
                                                          selections, trained))
        return self.report(scopes, results, selections)

    def load_data(self) -> None:
        from g2is_jax.data import load_records, suite

        cfg = self.cfg
        if cfg.suite is not None:
            s = cfg.suite

            def make_suite(d: Path) -> None:
                suite(d, n_pool=s.n_pool, n_dev=s.n_dev, n_test=s.n_test, seed=s.seed,
                      target=s.target, target_share=s.target_share, system=s.system)

            st = self.runner.stage("data: the synthetic suite", self.root / "data",
                                   {"suite": dataclasses.asdict(s)}, make_suite)
            self.targets = [TargetConfig(name="", dev=str(st.path / f"{s.target}.dev.jsonl"),
                                         test=str(st.path / f"{s.target}.test.jsonl"),
                                         domain=s.target)]
            pool_path = st.path / "pool.jsonl"
        elif cfg.targets:
            self.targets = list(cfg.targets)
            pool_path = Path(cfg.data.pool)
        else:
            self.targets = [TargetConfig(name="", dev=cfg.data.dev, test=cfg.data.test,
                                         domain=cfg.data.target_domain)]
            pool_path = Path(cfg.data.pool)
        paths = {"pool": pool_path}
        for t in self.targets:
            paths[self._role("dev", t)] = Path(t.dev)
            paths[self._role("test", t)] = Path(t.test)
            if t.train and "with-target" in cfg.select.pools:
                paths[self._role("train", t)] = Path(t.train)
        for key, p in paths.items():
            if not p.is_file():
                raise G2ISError(f"data file {p} ({key}) does not exist")
        self.paths = paths
        self.hashes = {k: _sha(p) for k, p in paths.items()}
        # A fine-tune's fingerprint names the target's own training file in both pool settings,
        # hashed whether or not this run uses it: a general-pool fine-tune must not be
        # recomputed because "with-target" was added to or dropped from `pools`.
        self.own_hashes = {
            self._role("train", t): self.hashes.get(self._role("train", t)) or _sha(Path(t.train))
            for t in self.targets if t.train and Path(t.train).is_file()}
        self.records = {k: load_records(p) for k, p in paths.items()}
        for k, recs in self.records.items():
            if not recs:
                raise G2ISError(f"{paths[k]} ({k}) holds no records")

    @staticmethod
    def _role(kind: str, target: TargetConfig) -> str:
        """The key of a target's file and features: "dev" for a one-target run, "dev-<name>"
        with [[targets]]."""
        return f"{kind}-{target.name}" if target.name else kind

    def warmup(self) -> None:
        from g2is_jax.train import train_lora

        cfg = self.cfg
        warm_cfg = cfg.warmup.train_config(cfg.max_length)

        def warmup(d: Path) -> None:
            model, tok = self.base_model()
            train_lora(model, tok, self.records["pool"], d, warm_cfg,
                       run_info={"model": cfg.model, "data": self.hashes["pool"]},
                       progress=self.progress)

        self.warm = self.runner.stage(
            "warmup", self.root / "warmup",
            {**self.model_inputs, "pool": self.hashes["pool"],
             "train": warm_cfg.to_json()},
            warmup)
        self.epochs = (list(range(1, warm_cfg.epochs + 1)) if cfg.features.checkpoints == "all"
                       else [warm_cfg.epochs])

    def compute_features(self) -> None:
        from g2is_jax.featurize import compute_features
        from g2is_jax.projection import Projector
        from g2is_jax.train import load_checkpoint

        cfg, fc = self.cfg, self.cfg.features
        projector = Projector(kind=fc.projection, dim=fc.dim, seed=fc.seed)
        roles = [("pool", "adam")]
        for t in self.targets:
            roles.append((self._role("dev", t), "sgd"))
            if self._role("train", t) in self.records:
                roles.append((self._role("train", t), "adam"))
        self.feature_stages: dict[tuple[int, str], Stage] = {}
        features_inputs = dataclasses.asdict(fc)
        if fc.dtype == "float32":
            del features_inputs["dtype"]  # see model_inputs
        for epoch in self.epochs:
            ckpt = self.warm.path / "checkpoints" / str(epoch)
            for role, kind in roles:

                def featurize(d: Path, ckpt=ckpt, role=role, kind=kind) -> None:
                    model, tok = self.base_model()
                    tuned, moments, meta = load_checkpoint(model, ckpt)
                    compute_features(tuned, tok, self.records[role], d, gradient=kind,
                                     projector=projector,
                                     moments=moments if kind == "adam" else None,
                                     batch_size=fc.batch_size, max_length=cfg.max_length,
                                     meta={"model": cfg.model, "checkpoint": str(ckpt),
                                           "checkpoint_lr": meta["epoch_mean_lr"],
                                           "data_sha256": self.hashes[role]},
                                     progress=self.progress, feature_dtype=fc.dtype)

                self.feature_stages[epoch, role] = self.runner.stage(
                    f"features: {kind} of the {role} at warmup epoch {epoch}",
                    self.root / "features" / f"epoch-{epoch}" / role,
                    {"warmup": self.warm.fingerprint, "epoch": epoch, "role": role,
                     "kind": kind, "data": self.hashes[role],
                     "features": features_inputs, "max_length": cfg.max_length},
                    featurize)

    def scopes(self) -> list[Scope]:
        if not self.cfg.targets:
            return [Scope("", "general", "", self.targets[0].domain)]
        return [Scope(t.name, pool, f"{t.name}/{pool}/", t.label)
                for pool in self.cfg.select.pools for t in self.targets]

    def plans(self) -> list[tuple[str, float, int]]:
        sc = self.cfg.select
        return [(m, r, s) for m in sc.methods for r in (sc.ratios if m != "full" else (1.0,))
                for s in sc.seeds]

    def _target(self, scope: Scope) -> TargetConfig:
        return next(t for t in self.targets if t.name == scope.target)

    def pool_records(self, scope: Scope) -> list:
        recs = self.records["pool"]
        if scope.pool == "with-target":
            recs = recs + self.records[self._role("train", self._target(scope))]
        return recs

    def selection_inputs(self, scope: Scope):
        """Per checkpoint the scope's pool features and its target's validation features."""
        from g2is_jax.select.features import check_pairing, checkpoint_weights
        from g2is_jax.select.methods import SelectionInputs

        target = self._target(scope)
        train, val = [], []
        for e in self.epochs:
            pool = self.features.get(self.feature_stages[e, "pool"].path, "train")
            dev = self.features.get(self.feature_stages[e, self._role("dev", target)].path,
                                    "validation")
            check_pairing([pool], [dev])
            array = pool.array
            if scope.pool == "with-target":
                own = self.features.get(
                    self.feature_stages[e, self._role("train", target)].path, "train")
                array = np.concatenate([np.asarray(pool.array), np.asarray(own.array)])
            train.append(array)
            val.append(dev.array)
        weights = checkpoint_weights([self.features.get(self.feature_stages[e, "pool"].path,
                                                        "train") for e in self.epochs])
        return SelectionInputs(train, val, weights, mesh=self._mesh())

    def _pool_inputs_fingerprint(self, scope: Scope) -> list[str]:
        target = self._target(scope)
        fps = []
        for e in self.epochs:
            fps.append(self.feature_stages[e, "pool"].fingerprint)
            fps.append(self.feature_stages[e, self._role("dev", target)].fingerprint)
            if scope.pool == "with-target":
                fps.append(self.feature_stages[e, self._role("train", target)].fingerprint)
        return fps

    def _mesh(self):
        if not self.cfg.select.mesh:
            return None
        if not hasattr(self, "_select_mesh"):
            from g2is_jax import sharding

            self._select_mesh = sharding.make_mesh(sharding.parse_mesh(self.cfg.select.mesh))
        return self._select_mesh

    def select(self, scope: Scope, method: str, ratio: float, seed: int):
        from g2is_jax.data import write_jsonl
        from g2is_jax.select.core import SelectionResult
        from g2is_jax.select.methods import method_config, run_method

        sc = self.cfg.select
        label = selection_label(method, ratio, seed)
        options = sc.options(ratio, seed)
        pool = self.pool_records(scope)

        def choose(d: Path) -> None:
            res = run_method(method, self.selection_inputs(scope), options)
            doc = res.to_json()
            doc["record_ids"] = [pool[i].id for i in res.indices]
            doc["config"] = {**method_config(method, options), "scope": scope.prefix,
                             "pool_setting": scope.pool}
            _write_json(d / "selection.json", doc)
            write_jsonl([pool[i] for i in res.indices], d / "selected.jsonl")

        if method == "random":
            inputs: dict[str, Any] = {"n_pool": len(pool), "method": method, "ratio": ratio,
                                      "seed": seed}
            if scope.prefix:
                inputs["scope"] = scope.prefix
        else:
            inputs = {"features": self._pool_inputs_fingerprint(scope),
                      "select": method_config(method, options)}
        st = self.runner.stage(f"select: {scope.name(label)}",
                               scope.path(self.root, "select", label), inputs, choose)
        doc = json.loads((st.path / "selection.json").read_text())
        return {"result": SelectionResult.from_json(doc), "fingerprint": st.fingerprint,
                "doc": doc}

    def _eval_inputs(self, target: TargetConfig) -> dict[str, Any]:
        ec = self.cfg.evaluate
        inputs = {"test": self.hashes[self._role("test", target)],
                  "evaluate": dataclasses.asdict(ec), "max_length": self.cfg.max_length,
                  **self.model_inputs}
        if target.max_new_tokens is not None:
            inputs["max_new_tokens"] = target.max_new_tokens
        return inputs

    def _evaluate_into(self, path: Path, target: TargetConfig, get_model) -> None:
        from g2is_jax.evaluate import evaluate_records

        ec = self.cfg.evaluate
        tests = self.records[self._role("test", target)]
        model = get_model()
        _, tok = self.base_model()
        res = evaluate_records(model, tok, tests, batch_size=ec.batch_size,
                               max_length=self.cfg.max_length, generate_answers=ec.generate,
                               max_new_tokens=target.max_new_tokens or ec.max_new_tokens,
                               progress=self.progress)
        _write_json(path, {"summary": res.summary(), "loss": res.loss.tolist(),
                           "predictions": res.predictions,
                           "exact_match": None if res.exact_match is None
                           else res.exact_match.astype(int).tolist(),
                           "record_ids": [r.id for r in tests]})

    def evaluate_base(self, target: TargetConfig) -> dict[str, Any]:
        path = (self.root / "eval" / target.name / "base.json" if target.name
                else self.root / "eval" / "base.json")
        name = f"evaluate: {target.name}/base model" if target.name else "evaluate: base model"
        st = self.runner.stage(name, path, self._eval_inputs(target),
                               lambda p: self._evaluate_into(p, target,
                                                             lambda: self.base_model()[0]))
        return {"target": target.name, "pool": None, "method": "base", "ratio": 0.0,
                "seed": None, "n_train": 0, "eval": str(st.path.relative_to(self.root)),
                **json.loads(st.path.read_text())["summary"]}

    def finetune_and_evaluate(self, scope: Scope, method: str, ratio: float, seed: int,
                              selections: dict[str, Any], trained: dict[str, dict[str, Any]]
                              ) -> dict[str, Any]:
        from g2is_jax.models.peft import save_peft_adapter
        from g2is_jax.train import load_checkpoint, train_lora

        cfg = self.cfg
        label = run_label(method, ratio, seed)
        pool = self.pool_records(scope)
        if method == "full":
            indices = list(range(len(pool)))
        else:
            sel = selections[scope.name(selection_label(method, ratio, seed))]
            indices = sorted(int(i) for i in sel["result"].indices)  # the set, in pool order
        subset = [pool[i] for i in indices]
        ft_cfg = cfg.finetune.train_config(cfg.max_length, seed=seed, fraction=1.0)
        pool_id = {"pool": self.hashes["pool"], "setting": scope.pool,
                   "own": self.own_hashes.get(self._role("train", self._target(scope)))}
        ft_inputs = {**self.model_inputs,
                     "subset": fingerprint({**pool_id, "indices": indices}),
                     "train": ft_cfg.to_json()}
        row = {"target": scope.target, "pool": scope.pool, "method": method, "ratio": ratio,
               "seed": seed, "n_train": len(subset)}
        key = finetune_key(scope.prefix, pool_id, indices, ft_inputs)
        if key in trained:  # the same set and seed, already trained here
            first = trained[key]
            return {**row, **{k: first[k] for k in ("eval", "mean_loss", "exact_match")
                              if k in first}, "same_as": first["label"]}

        def finetune(d: Path) -> None:
            model, tok = self.base_model()
            res = train_lora(model, tok, subset, d, ft_cfg, run_info={"model": cfg.model},
                             progress=self.progress)
            save_peft_adapter(res.model, d / "peft")

        ft = self.runner.stage(f"finetune: {scope.name(label)} ({len(subset)} records)",
                               scope.path(self.root, "finetune", label), ft_inputs, finetune)

        def tuned_model():
            model, _ = self.base_model()
            return load_checkpoint(model, ft.path / "checkpoints" / str(ft_cfg.epochs))[0]

        target = self._target(scope)
        ev = self.runner.stage(f"evaluate: {scope.name(label)}",
                               scope.path(self.root, "eval", f"{label}.json"),
                               {**self._eval_inputs(target), "finetune": ft.fingerprint},
                               lambda p: self._evaluate_into(p, target, tuned_model))
        row.update(json.loads(ev.path.read_text())["summary"])
        row["eval"] = str(ev.path.relative_to(self.root))
        trained[key] = {**row, "label": scope.name(label)}
        return row

    def report(self, scopes: list[Scope], results: list[dict[str, Any]],
               selections: dict[str, Any]) -> dict[str, Any]:
        from g2is_jax.report import write_report

        walk_features = {}
        for scope in scopes:
            if any(m.startswith("g2is") for m in self.cfg.select.methods):
                from g2is_jax.select.methods import walk_inputs

                walk_features[scope.prefix] = np.asarray(walk_inputs(
                    self.selection_inputs(scope), pool_mean=self.cfg.select.pool_mean)[0])
        sizes = {k: len(v) for k, v in self.records.items()}
        if self.report_to is None:
            raise ValueError("a read-only pipeline writes its report elsewhere: pass report_to")
        self.report_to.mkdir(parents=True, exist_ok=True)
        report = write_report(
            self.report_to, cfg=self.cfg, results=results, selections=selections,
            pools={s.prefix: self.pool_records(s) for s in scopes},
            scopes=scopes, sizes=sizes,
            stages=[{"name": s.name, "cached": s.cached, "seconds": round(s.seconds, 2)}
                    for s in self.runner.stages],
            machine=machine_info(), pool_features=walk_features,
            seconds=round(time.perf_counter() - self.t_start, 1), run_dir=self.root)
        if self.echo:
            print(f"[g2is run] report: {self.report_to / 'report.md'}", flush=True)
        return report


def finetune_key(scope: str, pool: Any, indices: Any, train: Any) -> str:
    """Two fine-tunes with equal keys are the same: same scope and pool, the same *set* of
    records (order ignored), the same training inputs (config, seed)."""
    return fingerprint({"scope": scope, "pool": pool, "set": sorted(int(i) for i in indices),
                        "train": train})


def _check_run_dir(root: Path, cfg: RunConfig) -> None:
    """Remember the config; a changed config is fine (stages re-run as needed), logged."""
    path = root / "run_config.json"
    doc = cfg.to_json()
    if path.exists():
        old = json.loads(path.read_text())
        if old != doc:
            changed = sorted(k for k in set(old) | set(doc) if old.get(k) != doc.get(k))
            log.info("run config changed in %s since the last run: %s", root, changed)
    _write_json(path, doc)


__all__ = ["Runner", "Scope", "fingerprint", "finetune_key", "machine_info", "report_finished",
           "run_label", "run_pipeline", "selection_label"]
