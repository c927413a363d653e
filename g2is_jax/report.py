"""The report of a `g2is run`: report.json (everything), report.md (tables + plots), plots/.

Rows are one per (target, pool setting, method, ratio, seed) fine-tune plus `base` (no
fine-tune) per target: target-test mean loss (mean over records of the mean completion-token NLL)
and exact-match accuracy. The summary gives mean ± standard deviation over seeds; the paired
comparisons (compare.py) give each walk method's difference to less and to random with a
bootstrap confidence interval and a verdict. Where the pool's records carry labels
(`meta.domain`, `meta.kind`, as the synthetic suite's and the experiment script's do), each
selection is also scored against them. The diagnostics say, per selection, whether the walk's
no-conflict rule could mean anything on these features.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from g2is_jax.compare import compare_runs
from g2is_jax.data import Record
from g2is_jax.io import atomic_write

METRICS = ("mean_loss", "exact_match")
REFERENCES = ("less", "random")  # what each walk method is compared with


def selection_quality(pool: Sequence[Record], indices: Sequence[int],
                      target: str | None) -> dict[str, Any] | None:
    """Counts of a selection against the pool's labels; None when the pool is unlabelled."""
    if target is None or not pool or "domain" not in pool[0].meta:
        return None
    chosen = [pool[i].meta for i in indices]
    n = max(len(chosen), 1)
    in_target = [m for m in chosen if m.get("domain") == target]
    clean = sum(m.get("kind", "clean") == "clean" for m in in_target)
    conflict = sum(m.get("kind") == "conflict" for m in in_target)
    n_target_pool = sum(r.meta.get("domain") == target for r in pool)
    return {"n": len(chosen), "target": len(in_target), "target_clean": clean,
            "target_conflict": conflict, "precision": clean / n,
            "recall": len(in_target) / max(n_target_pool, 1),
            "distractors": sum(m.get("kind") == "distractor" for m in chosen),
            "domains": dict(Counter(str(m.get("domain")) for m in chosen).most_common())}


def _group_key(r: Mapping[str, Any]) -> tuple:
    return (r.get("target", ""), r.get("pool"), r["method"], r["ratio"])


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (target, pool setting, method, ratio)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(_group_key(r), []).append(r)
    out = []
    for (target, pool, method, ratio), rs in groups.items():
        entry: dict[str, Any] = {"target": target, "pool": pool, "method": method,
                                 "ratio": ratio, "seeds": len(rs), "n_train": rs[0]["n_train"]}
        same = sorted({r["same_as"] for r in rs if r.get("same_as")})
        if same:
            entry["same_as"] = same
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                entry[m] = float(np.mean(vals))
                entry[f"{m}_std"] = float(np.std(vals))
        out.append(entry)
    return out


def comparisons(root: Path, rows: Sequence[Mapping[str, Any]], *, seed: int = 0
                ) -> list[dict[str, Any]]:
    """Paired comparisons of every walk method with less and random, per target, pool setting
    and ratio, on the per-record test metrics of the same fine-tune seeds."""
    by_group: dict[tuple, dict[Any, Mapping[str, Any]]] = {}
    for r in rows:
        if r["method"] in ("base", "full") or "eval" not in r:
            continue
        by_group.setdefault(_group_key(r), {})[r["seed"]] = r
    out = []
    for (target, pool, method, ratio), runs in by_group.items():
        if not method.startswith("g2is"):
            continue
        for ref in REFERENCES:
            other = by_group.get((target, pool, ref, ratio))
            if not other:
                continue
            seeds = sorted(set(runs) & set(other))
            if not seeds:
                continue
            docs_a = [json.loads((root / runs[s]["eval"]).read_text()) for s in seeds]
            docs_b = [json.loads((root / other[s]["eval"]).read_text()) for s in seeds]
            entry: dict[str, Any] = {"target": target, "pool": pool, "ratio": ratio,
                                     "method": method, "against": ref, "seeds": seeds}
            for m in METRICS:
                res = compare_runs(docs_a, docs_b, m, seed=seed)
                if res is not None:
                    entry[m] = res
            out.append(entry)
    return out


def _groups(pool: Sequence[Record], target: str | None) -> list[str] | None:
    if target is None or not pool or "domain" not in pool[0].meta:
        return None
    out = []
    for r in pool:
        if r.meta.get("kind") == "distractor":
            out.append("distractor")
        elif r.meta.get("domain") == target:
            out.append(f"target ({r.meta.get('kind', 'clean')})")
        else:
            out.append("other task")
    return out


def write_report(root: Path, *, cfg, results: list[dict[str, Any]],
                 selections: Mapping[str, Mapping[str, Any]],
                 pools: Mapping[str, Sequence[Record]], scopes: Sequence[Any],
                 sizes: Mapping[str, int], stages: list[dict[str, Any]],
                 machine: Mapping[str, Any], pool_features: Mapping[str, np.ndarray],
                 seconds: float, run_dir: Path | None = None) -> dict[str, Any]:
    """Write ROOT/report.json, ROOT/report.md and ROOT/plots/*.png; return the report dict.
    The results' evaluation files are read from `run_dir` (default: ROOT, the run's folder).

    `selections` maps a selection's name (scope prefix + label) to {"result": SelectionResult,
    "doc": its selection.json}; `pools` and `pool_features` are keyed by scope prefix.
    """
    from g2is_jax import plots

    quality, diagnostics = {}, {}
    for name, sel in selections.items():
        scope = _scope_of(name, scopes)
        res = sel["result"]
        q = selection_quality(pools[scope.prefix], res.indices, scope.domain)
        if q is not None:
            quality[name] = q
        if res.diagnostics:
            diagnostics[name] = res.diagnostics
    plot_dir = root / "plots"
    figures: dict[str, str] = {}
    for scope in scopes:
        rows = [r for r in results if r.get("target", "") == scope.target
                and r.get("pool") in (scope.pool, None)]
        for m in METRICS:
            if any(r.get(m) is not None for r in rows):
                stem = f"{scope.target}-{scope.pool}-{m}" if scope.prefix else m
                title = f"{scope.target} ({scope.pool} pool): {m}" if scope.prefix else None
                p = plots.plot_metric(rows, m, plot_dir / f"{stem}.png", title=title)
                figures[stem if scope.prefix else m] = str(p.relative_to(root))
        feats = pool_features.get(scope.prefix)
        if feats is None:
            continue
        xy = plots.layout_2d(feats)
        groups = _groups(pools[scope.prefix], scope.domain)
        for name, sel in selections.items():
            if _scope_of(name, scopes) != scope or not sel["result"].method.startswith("g2is"):
                continue
            stem = name.replace("/", "-")
            p = plots.plot_walk(feats, sel["result"], plot_dir / f"walk_{stem}.png",
                                groups=groups, xy=xy,
                                title=f"{name}: the pool's gradient features and the walk")
            figures[f"walk {name}"] = str(p.relative_to(root))
            p = plots.plot_budgets(sel["result"].per_component, plot_dir / f"budgets_{stem}.png",
                                   title=f"{name}: budget vs achieved per component")
            figures[f"budgets {name}"] = str(p.relative_to(root))
    report = {
        "config": cfg.to_json(),
        "machine": dict(machine),
        "sizes": dict(sizes),
        "results": results,
        "summary": summarize(results),
        "comparisons": comparisons(run_dir or root, results),
        "selection_quality": quality,
        "diagnostics": diagnostics,
        "conventions": {name: sel["result"].conventions for name, sel in selections.items()},
        "figures": figures,
        "stages": stages,
        "seconds": seconds,
    }
    atomic_write(root / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write(root / "report.md", format_report(report))
    return report


def _scope_of(name: str, scopes: Sequence[Any]):
    """The scope a selection name belongs to (the longest matching prefix)."""
    return max((s for s in scopes if name.startswith(s.prefix)), key=lambda s: len(s.prefix))


def _pm(entry: Mapping[str, Any], key: str, digits: int) -> str:
    if key not in entry:
        return "–"
    text = f"{entry[key]:.{digits}f}"
    if entry.get("seeds", 1) > 1:
        text += f" ± {entry[f'{key}_std']:.{digits}f}"
    return text


def _ci(c: Mapping[str, Any], digits: int = 3) -> str:
    return f"{c['diff']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}]"


def verdict_lines(comps: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per (target, pool, ratio, method, reference): the verdict on each metric."""
    lines = []
    for c in comps:
        parts = []
        for m, word in (("mean_loss", "test loss"), ("exact_match", "exact match")):
            if m in c:
                parts.append(f"{word} {c[m]['verdict']} ({_ci(c[m])})")
        where = f"{c['target']} ({c['pool']} pool, ratio {c['ratio']:g})" if c["target"] else \
            f"ratio {c['ratio']:g}"
        lines.append(f"{where}: {c['method']} vs {c['against']}: " + "; ".join(parts))
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    cfg = report["config"]
    sizes = report["sizes"]
    sc = cfg["select"]
    lines = [
        f"# g2is run: model `{cfg['model']}`",
        "",
        "Sizes (records): " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + f"; methods "
        f"{', '.join(sc['methods'])}, ratios {', '.join(f'{r:g}' for r in sc['ratios'])}, "
        f"seeds {', '.join(str(s) for s in sc['seeds'])}. Conventions: pca_sign "
        f"{sc['pca_sign']}, val_normalize {sc['val_normalize']}, pool_mean "
        f"{sc.get('pool_mean', 'keep')}, neighbors "
        f"{sc['neighbors'] or 'all'} (100 is this project's default), delta {sc['delta']}.",
        "",
        "## Target test metrics (mean ± sd over seeds)",
        "",
        "| target | pool | method | ratio | records trained | seeds | test loss | exact match |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in report["summary"]:
        ratio = "–" if e["method"] in ("base", "full") else f"{e['ratio']:g}"
        note = f" (same set as {', '.join(e['same_as'])})" if e.get("same_as") else ""
        lines.append(f"| {e.get('target') or '–'} | {e.get('pool') or '–'} | {e['method']}{note} "
                     f"| {ratio} | {e['n_train']} | {e['seeds']} | {_pm(e, 'mean_loss', 3)} | "
                     f"{_pm(e, 'exact_match', 3)} |")
    comps = report.get("comparisons") or []
    if comps:
        lines += ["", "## Paired differences (method − reference; 95% bootstrap interval over "
                  "seeds and test records)", "",
                  "Lower loss and higher exact match are better. With many comparisons some "
                  "intervals exclude zero by chance (about 1 in 20 each when nothing differs).",
                  ""]
        lines += [f"- {line}" for line in verdict_lines(comps)]
    quality = report.get("selection_quality") or {}
    if quality:
        lines += ["", "## Selections against the pool's labels", "",
                  "| selection | rows | target (clean) | target (conflicting) | precision | "
                  "recall | distractors | sources |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for label, q in quality.items():
            top = ", ".join(f"{k} {v}" for k, v in list(q.get("domains", {}).items())[:4])
            lines.append(f"| {label} | {q['n']} | {q['target_clean']} | {q['target_conflict']} "
                         f"| {q['precision']:.2f} | {q['recall']:.2f} | {q['distractors']} | "
                         f"{top} |")
    diag = report.get("diagnostics") or {}
    if diag:
        lines += ["", "## Diagnostics: can the no-conflict rule mean anything here?", "",
                  "| selection | pool pairs with cos < 0 | pool energy on the mean direction | "
                  "selected pairs with cos < 0 | walk: rejected by conflict / consistency "
                  "per step |", "|---|---:|---:|---:|---:|"]
        warnings: dict[str, str] = {}
        for label, d in diag.items():
            pool, sel = d.get("pool") or {}, d.get("selection") or {}
            walk = d.get("walk")
            per_step = "–"
            if walk and walk.get("candidates"):
                per_step = (f"{walk['conflict_rejected'] / walk['candidates']:.1%} / "
                            f"{walk['consistency_rejected'] / walk['candidates']:.1%}")
            lines.append(f"| {label} | {pool.get('negative_pair_fraction', 0):.2%} | "
                         f"{pool.get('mean_direction_energy', 0):.0%} | "
                         f"{sel.get('negative_pair_fraction', 0):.2%} | {per_step} |")
            for w in d.get("verdict", []):
                warnings.setdefault(w, label)
        if warnings:
            lines += [""] + [f"- **Warning** ({label}): {w}." for w, label in warnings.items()]
    if report.get("figures"):
        lines += ["", "## Plots", ""]
        for name, rel in report["figures"].items():
            lines.append(f"![{name}]({rel})")
    m = report["machine"]
    lines += ["", "## Stages", "", "| stage | seconds | cached |", "|---|---:|---|"]
    for s in report["stages"]:
        lines.append(f"| {s['name']} | {s['seconds']:.1f} | {'yes' if s['cached'] else ''} |")
    lines += ["", f"Total {report['seconds']} s on {m['devices']} ({m['backend']}), "
              f"{m['cpu_count']} CPUs, {m['platform']}, jax {m['jax']}.", ""]
    return "\n".join(lines)


__all__ = ["comparisons", "format_report", "selection_quality", "summarize", "verdict_lines",
           "write_report"]
