"""`g2is run`: the whole pipeline in one run directory, every stage cached and resumable.

Stages and where they write (RUN = the run directory):

  data       RUN/data/                 the synthetic suite (only with a [suite] table)
  warmup     RUN/warmup/               LoRA warmup on a sample of the pool, a checkpoint per epoch
  features   RUN/features/epoch-E/{pool,dev}   Adam features of the pool, SGD features of the
                                       target's validation examples, at each used checkpoint
  select     RUN/select/LABEL/         selection.json and selected.jsonl per method and ratio
                                       (and seed, for random)
  finetune   RUN/finetune/LABEL-sS/    LoRA fine-tune on the selection (PEFT export in peft/)
  evaluate   RUN/eval/LABEL-sS.json    target-test loss and exact match (and `base`)
  report     RUN/report.{md,json}, RUN/plots/*.png

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
from g2is_jax.runconfig import RunConfig

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"


def fingerprint(inputs: Any) -> str:
    """A short stable hash of a JSON-able description of a stage's inputs."""
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


@dataclasses.dataclass
class Stage:
    name: str
    path: Path
    fingerprint: str
    cached: bool
    seconds: float


class Runner:
    """Runs stages in RUN; records what ran and what was reused."""

    def __init__(self, root: Path, *, echo: bool = True):
        self.root = root
        self.echo = echo
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
    """RUN/select/<label>: g2is and less do not depend on the seed; random does; full is all."""
    if method == "full":
        return "full"
    base = f"{method}-r{ratio:g}"
    return f"{base}-s{seed}" if method == "random" else base


def run_label(method: str, ratio: float, seed: int) -> str:
    """RUN/finetune/<label> and RUN/eval/<label>.json: a selection trained with one seed."""
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


def run_pipeline(cfg: RunConfig, out: str | Path, *, progress: bool = True,
                 echo: bool = True) -> dict[str, Any]:
    """Run (or resume) the pipeline of `cfg` in `out`; returns the report (also on disk)."""
    from g2is_jax.data import load_records, suite
    from g2is_jax.featurize import compute_features
    from g2is_jax.fingerprint import model_fingerprint
    from g2is_jax.models.loading import load_model
    from g2is_jax.projection import Projector
    from g2is_jax.report import write_report
    from g2is_jax.train import load_checkpoint, train_lora

    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    _check_run_dir(root, cfg)
    runner = Runner(root, echo=echo)
    t_start = time.perf_counter()

    # -- data ---------------------------------------------------------------------------------
    if cfg.suite is not None:
        s = cfg.suite

        def make_suite(d: Path) -> None:
            suite(d, n_pool=s.n_pool, n_dev=s.n_dev, n_test=s.n_test, seed=s.seed,
                  target=s.target, target_share=s.target_share, system=s.system)

        data_stage = runner.stage("data: the synthetic suite", root / "data",
                                  {"suite": dataclasses.asdict(s)}, make_suite)
        paths = {"pool": data_stage.path / "pool.jsonl",
                 "dev": data_stage.path / f"{s.target}.dev.jsonl",
                 "test": data_stage.path / f"{s.target}.test.jsonl"}
    else:
        paths = {k: Path(getattr(cfg.data, k)) for k in ("pool", "dev", "test")}
        for k, p in paths.items():
            if not p.is_file():
                raise G2ISError(f"data.{k} file {p} does not exist")
    hashes = {k: _sha(p) for k, p in paths.items()}
    records = {k: load_records(p) for k, p in paths.items()}
    for k, recs in records.items():
        if not recs:
            raise G2ISError(f"data.{k} ({paths[k]}) holds no records")

    cache: dict[str, Any] = {}

    def base_model():
        if "model" not in cache:
            cache["model"], cache["tok"] = load_model(cfg.model)
        return cache["model"], cache["tok"]

    # -- warmup -------------------------------------------------------------------------------
    warm_cfg = cfg.warmup.train_config(cfg.max_length)
    # The model's content (weights, config, tokenizer files), not its path text: every stage
    # that reads the model depends on it (g2is_jax.fingerprint).
    model_fp = model_fingerprint(cfg.model)

    def warmup(d: Path) -> None:
        model, tok = base_model()
        train_lora(model, tok, records["pool"], d, warm_cfg,
                   run_info={"model": cfg.model, "data": hashes["pool"]}, progress=progress)

    warm = runner.stage("warmup", root / "warmup",
                        {"model_fingerprint": model_fp, "pool": hashes["pool"],
                         "train": warm_cfg.to_json()}, warmup)
    epochs = (list(range(1, warm_cfg.epochs + 1)) if cfg.features.checkpoints == "all"
              else [warm_cfg.epochs])

    # -- features -----------------------------------------------------------------------------
    fc = cfg.features
    projector = Projector(kind=fc.projection, dim=fc.dim, seed=fc.seed)
    feature_stages: dict[tuple[int, str], Stage] = {}
    for epoch in epochs:
        ckpt = warm.path / "checkpoints" / str(epoch)
        for role, kind in (("pool", "adam"), ("dev", "sgd")):

            def featurize(d: Path, ckpt=ckpt, role=role, kind=kind) -> None:
                model, tok = base_model()
                tuned, moments, meta = load_checkpoint(model, ckpt)
                compute_features(tuned, tok, records[role], d, gradient=kind,
                                 projector=projector,
                                 moments=moments if kind == "adam" else None,
                                 batch_size=fc.batch_size, max_length=cfg.max_length,
                                 meta={"model": cfg.model, "checkpoint": str(ckpt),
                                       "checkpoint_lr": meta["epoch_mean_lr"],
                                       "data_sha256": hashes[role]},
                                 progress=progress)

            feature_stages[epoch, role] = runner.stage(
                f"features: {kind} of the {role} at warmup epoch {epoch}",
                root / "features" / f"epoch-{epoch}" / role,
                {"warmup": warm.fingerprint, "epoch": epoch, "role": role, "kind": kind,
                 "data": hashes[role], "features": dataclasses.asdict(fc),
                 "max_length": cfg.max_length}, featurize)

    # -- select -------------------------------------------------------------------------------
    sc = cfg.select
    feat_fps = [feature_stages[k].fingerprint for k in sorted(feature_stages)]
    select_stages: dict[str, Stage] = {}
    selections: dict[str, dict[str, Any]] = {}
    plans: list[tuple[str, float, int]] = []
    for method in sc.methods:
        for ratio in (sc.ratios if method != "full" else (1.0,)):
            for seed in sc.seeds:
                plans.append((method, ratio, seed))
                label = selection_label(method, ratio, seed)
                if method == "full" or label in select_stages:
                    continue

                def choose(d: Path, method=method, ratio=ratio, seed=seed) -> None:
                    res = _select(cfg, feature_stages, epochs, method, ratio, seed)
                    doc = res.to_json()
                    doc["record_ids"] = [records["pool"][i].id for i in res.indices]
                    doc["config"] = {"method": method, "ratio": ratio, "seed": seed,
                                     **dataclasses.asdict(sc)}
                    _write_json(d / "selection.json", doc)
                    from g2is_jax.data import write_jsonl

                    write_jsonl([records["pool"][i] for i in res.indices], d / "selected.jsonl")

                inputs = {"features": feat_fps, "method": method, "ratio": ratio,
                          "select": {k: v for k, v in dataclasses.asdict(sc).items()
                                     if k not in ("methods", "ratios", "seeds")}}
                if method == "random":
                    inputs = {"n_pool": len(records["pool"]), "method": method,
                              "ratio": ratio, "seed": seed}
                select_stages[label] = runner.stage(f"select: {label}",
                                                    root / "select" / label, inputs, choose)
                selections[label] = json.loads(
                    (select_stages[label].path / "selection.json").read_text())

    # -- finetune and evaluate ----------------------------------------------------------------
    ec = cfg.evaluate
    eval_inputs = {"test": hashes["test"], "evaluate": dataclasses.asdict(ec),
                   "max_length": cfg.max_length, "model_fingerprint": model_fp}

    def evaluate_into(path: Path, get_model: Callable[[], Any]) -> None:
        from g2is_jax.evaluate import evaluate_records

        model = get_model()
        _, tok = base_model()
        res = evaluate_records(model, tok, records["test"], batch_size=ec.batch_size,
                               max_length=cfg.max_length, generate_answers=ec.generate,
                               max_new_tokens=ec.max_new_tokens, progress=progress)
        _write_json(path, {"summary": res.summary(), "loss": res.loss.tolist(),
                           "predictions": res.predictions,
                           "exact_match": None if res.exact_match is None
                           else res.exact_match.astype(int).tolist(),
                           "record_ids": [r.id for r in records["test"]]})

    results: list[dict[str, Any]] = []
    if ec.base:
        st = runner.stage("evaluate: base model", root / "eval" / "base.json", eval_inputs,
                          lambda p: evaluate_into(p, lambda: base_model()[0]))
        results.append({"method": "base", "ratio": 0.0, "seed": None, "n_train": 0,
                        **json.loads(st.path.read_text())["summary"]})
    ft_template = cfg.finetune
    for method, ratio, seed in plans:
        sel_label, label = selection_label(method, ratio, seed), run_label(method, ratio, seed)
        if method == "full":
            subset, sel_fp = records["pool"], hashes["pool"]
        else:
            subset = [records["pool"][i] for i in selections[sel_label]["indices"]]
            sel_fp = select_stages[sel_label].fingerprint
        ft_cfg = ft_template.train_config(cfg.max_length, seed=seed, fraction=1.0)

        def finetune(d: Path, subset=subset, ft_cfg=ft_cfg) -> None:
            model, tok = base_model()
            res = train_lora(model, tok, subset, d, ft_cfg,
                             run_info={"model": cfg.model}, progress=progress)
            from g2is_jax.models.peft import save_peft_adapter

            save_peft_adapter(res.model, d / "peft")

        ft = runner.stage(f"finetune: {label} ({len(subset)} records)",
                          root / "finetune" / label,
                          {"model_fingerprint": model_fp, "selection": sel_fp,
                           "train": ft_cfg.to_json()},
                          finetune)

        def tuned_model(ft=ft, ft_cfg=ft_cfg):
            model, _ = base_model()
            return load_checkpoint(model, ft.path / "checkpoints" / str(ft_cfg.epochs))[0]

        ev = runner.stage(f"evaluate: {label}", root / "eval" / f"{label}.json",
                          {**eval_inputs, "finetune": ft.fingerprint},
                          lambda p, get=tuned_model: evaluate_into(p, get))
        results.append({"method": method, "ratio": ratio, "seed": seed,
                        "n_train": len(subset), **json.loads(ev.path.read_text())["summary"]})

    # -- report -------------------------------------------------------------------------------
    pool_feats = None
    if "g2is" in sc.methods:
        pool_feats = _combined(feature_stages, epochs, "pool")
    report = write_report(
        root, cfg=cfg, results=results, selections=selections, pool=records["pool"],
        sizes={k: len(v) for k, v in records.items()},
        stages=[{"name": s.name, "cached": s.cached, "seconds": round(s.seconds, 2)}
                for s in runner.stages],
        machine=machine_info(), pool_features=pool_feats,
        seconds=round(time.perf_counter() - t_start, 1))
    if echo:
        print(f"[g2is run] report: {root / 'report.md'}", flush=True)
    return report


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


def _load_sets(feature_stages, epochs, role):
    from g2is_jax.select.features import load_features

    return [load_features(feature_stages[e, role].path, role="train" if role == "pool"
                          else "validation") for e in epochs]


def _combined(feature_stages, epochs, role) -> np.ndarray:
    from g2is_jax.select.features import checkpoint_weights, combine_checkpoints

    sets = _load_sets(feature_stages, epochs, role)
    weights = checkpoint_weights(_load_sets(feature_stages, epochs, "pool"))
    return np.asarray(combine_checkpoints([s.array for s in sets], weights))


def _select(cfg: RunConfig, feature_stages, epochs, method: str, ratio: float, seed: int):
    from g2is_jax import select as sel
    from g2is_jax.select.features import check_pairing, checkpoint_weights

    train = _load_sets(feature_stages, epochs, "pool")
    val = _load_sets(feature_stages, epochs, "dev")
    check_pairing(train, val)
    weights = checkpoint_weights(train)
    if method == "random":
        return sel.random_select(train[0].n, ratio=ratio, seed=seed)
    if method == "less":
        return sel.less_select([t.array for t in train], [v.array for v in val], ratio=ratio,
                               weights=weights)
    sc = cfg.select
    return sel.g2is_select(_combined(feature_stages, epochs, "pool"),
                           _combined(feature_stages, epochs, "dev"), ratio=ratio,
                           delta=sc.delta, pca_variance=sc.pca_variance,
                           n_components=sc.n_components, neighbors=sc.neighbors)


__all__ = ["Runner", "fingerprint", "machine_info", "run_label", "run_pipeline",
           "selection_label"]
