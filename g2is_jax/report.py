"""The report of a `g2is run`: report.json (everything), report.md (tables + plots), plots/.

Rows are one per (method, ratio, seed) fine-tune plus `base` (no fine-tune): target-test mean
loss (mean over records of the mean completion-token NLL) and exact-match accuracy. Where the
pool's records carry generator labels (`meta.domain`, `meta.kind`, as the synthetic suite's do),
each selection is also scored against them: how much of it is target-domain data, clean or
conflicting, and how much is distractors.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from g2is_jax.data import Record
from g2is_jax.io import atomic_write

METRICS = ("mean_loss", "exact_match")


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


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (method, ratio)."""
    groups: dict[tuple[str, float], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"]), []).append(r)
    out = []
    for (method, ratio), rs in groups.items():
        entry: dict[str, Any] = {"method": method, "ratio": ratio, "seeds": len(rs),
                                 "n_train": rs[0]["n_train"]}
        for m in METRICS:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if vals:
                entry[m] = float(np.mean(vals))
                entry[f"{m}_std"] = float(np.std(vals))
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
                 selections: Mapping[str, Mapping[str, Any]], pool: Sequence[Record],
                 sizes: Mapping[str, int], stages: list[dict[str, Any]],
                 machine: Mapping[str, Any], pool_features: np.ndarray | None,
                 seconds: float) -> dict[str, Any]:
    """Write RUN/report.json, RUN/report.md and RUN/plots/*.png; return the report dict."""
    from g2is_jax import plots

    target = cfg.target_domain
    quality = {label: q for label, sel in selections.items()
               if (q := selection_quality(pool, sel["indices"], target)) is not None}
    plot_dir = root / "plots"
    figures: dict[str, str] = {}
    for m in METRICS:
        if any(r.get(m) is not None for r in results):
            p = plots.plot_metric(results, m, plot_dir / f"{m}.png")
            figures[m] = str(p.relative_to(root))
    groups = _groups(pool, target)
    for label, sel in selections.items():
        if not label.startswith("g2is") or pool_features is None:
            continue
        p = plots.plot_walk(pool_features, sel, plot_dir / f"walk_{label}.png", groups=groups,
                            title=f"{label}: the pool's gradient features and the walk")
        figures[f"walk {label}"] = str(p.relative_to(root))
        p = plots.plot_budgets(sel["per_component"], plot_dir / f"budgets_{label}.png",
                               title=f"{label}: budget vs achieved per component")
        figures[f"budgets {label}"] = str(p.relative_to(root))
    report = {
        "config": cfg.to_json(),
        "machine": dict(machine),
        "sizes": dict(sizes),
        "results": results,
        "summary": summarize(results),
        "selection_quality": quality,
        "figures": figures,
        "stages": stages,
        "seconds": seconds,
    }
    atomic_write(root / "report.json", json.dumps(report, indent=1) + "\n")
    atomic_write(root / "report.md", format_report(report))
    return report


def _pm(entry: Mapping[str, Any], key: str, digits: int) -> str:
    if key not in entry:
        return "–"
    text = f"{entry[key]:.{digits}f}"
    if entry.get("seeds", 1) > 1:
        text += f" ± {entry[f'{key}_std']:.{digits}f}"
    return text


def format_report(report: Mapping[str, Any]) -> str:
    cfg = report["config"]
    sizes = report["sizes"]
    lines = [
        f"# g2is run: model `{cfg['model']}`",
        "",
        f"Pool {sizes['pool']} records, target validation {sizes['dev']}, target test "
        f"{sizes['test']}; methods {', '.join(cfg['select']['methods'])}, ratios "
        f"{', '.join(f'{r:g}' for r in cfg['select']['ratios'])}, seeds "
        f"{', '.join(str(s) for s in cfg['select']['seeds'])}.",
        "",
        "## Target test metrics",
        "",
        "| method | ratio | records trained | seeds | test loss | exact match |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for e in report["summary"]:
        ratio = "–" if e["method"] in ("base", "full") else f"{e['ratio']:g}"
        lines.append(f"| {e['method']} | {ratio} | {e['n_train']} | {e['seeds']} | "
                     f"{_pm(e, 'mean_loss', 3)} | {_pm(e, 'exact_match', 3)} |")
    quality = report.get("selection_quality") or {}
    if quality:
        lines += ["", "## Selections against the generator's labels", "",
                  "| selection | rows | target (clean) | target (conflicting) | precision | "
                  "recall | distractors |", "|---|---:|---:|---:|---:|---:|---:|"]
        for label, q in quality.items():
            lines.append(f"| {label} | {q['n']} | {q['target_clean']} | {q['target_conflict']} "
                         f"| {q['precision']:.2f} | {q['recall']:.2f} | {q['distractors']} |")
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


__all__ = ["format_report", "selection_quality", "summarize", "write_report"]
