"""Report plots (matplotlib, Agg backend, PNG): metrics per method and budget, the instruction
graph around a selection with the walk's path, and budget vs achieved per component.

Each function takes arrays and a selection (a `SelectionResult`, or its JSON as in
selection.json) and a path, draws one figure, saves it and returns the path. Nothing here
computes a selection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_MAX_BACKGROUND = 20_000  # rows drawn as the grey cloud; the selection is always drawn


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def layout_2d(features: np.ndarray) -> np.ndarray:
    """A 2-D layout of feature rows: the top two principal components of the unit rows.

    The graph's edges are cosine similarities, so rows are normalised first (norm floor 1e-10,
    as the walk); the PCA is an SVD of the centred unit rows (float64).
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"features must be a non-empty 2-D array, got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-10)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    if out.shape[1] < 2:
        out = np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    return out


def plot_metric(rows: Sequence[Mapping[str, Any]], metric: str, path: str | Path, *,
                title: str | None = None) -> Path:
    """Grouped bars: `metric` per method (colour) and budget ratio (x), mean over seeds with
    each seed as a dot; `base` and `full` rows as horizontal reference lines."""
    plt = _pyplot()
    rows = [r for r in rows if r.get(metric) is not None and np.isfinite(r[metric])]
    refs = [r for r in rows if r["method"] in ("base", "full")]
    sel = [r for r in rows if r["method"] not in ("base", "full")]
    methods = list(dict.fromkeys(r["method"] for r in sel))
    ratios = sorted({r["ratio"] for r in sel})
    fig, ax = plt.subplots(figsize=(max(4.5, 1.6 * len(ratios) * max(len(methods), 1)), 3.6))
    width = 0.8 / max(len(methods), 1)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        for i, ratio in enumerate(ratios):
            vals = [r[metric] for r in sel if r["method"] == m and r["ratio"] == ratio]
            if not vals:
                continue
            x = i - 0.4 + width * (j + 0.5)
            ax.bar(x, np.mean(vals), width * 0.9, color=cmap(j),
                   label=m if i == 0 else None)
            ax.scatter([x] * len(vals), vals, color="black", s=10, zorder=3)
    for k, m in enumerate(dict.fromkeys(r["method"] for r in refs)):
        vals = [r[metric] for r in refs if r["method"] == m]
        ax.axhline(float(np.mean(vals)), color="grey", ls=("--", ":")[k % 2], lw=1,
                   label=f"{m} (mean)")
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_xlabel("selection budget (fraction of the pool)")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(title or f"target test {metric.replace('_', ' ')} by method and budget")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _as_doc(selection: Any) -> Mapping[str, Any]:
    return selection.to_json() if hasattr(selection, "to_json") else selection


def plot_walk(features: np.ndarray, selection: Any, path: str | Path, *,
              groups: Sequence[str] | None = None, title: str | None = None,
              seed: int = 0, xy: np.ndarray | None = None) -> Path:
    """The pool in 2-D (`layout_2d`, or a precomputed `xy`), the selected rows marked, and the
    walk's path drawn per walk: consecutive rows chosen by one walk are joined in the order
    chosen; anchors are stars, fallback steps dashed. `groups` (one label per pool row) colours
    the cloud."""
    plt = _pyplot()
    selection = _as_doc(selection)
    idx = np.asarray(selection["indices"], dtype=np.int64)
    comps = np.asarray(selection.get("components") or [-1] * len(idx), dtype=np.int64)
    steps = list(selection.get("steps") or ["score"] * len(idx))
    xy = layout_2d(features) if xy is None else xy
    n = len(xy)
    rng = np.random.default_rng(seed)
    background = np.arange(n) if n <= _MAX_BACKGROUND else np.sort(
        rng.choice(n, _MAX_BACKGROUND, replace=False))
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    if groups is not None:
        labels = np.asarray(groups, dtype=object)
        names = list(dict.fromkeys(labels[background]))
        pal = plt.get_cmap("Set2")
        for k, g in enumerate(names):
            mine = background[labels[background] == g]
            ax.scatter(xy[mine, 0], xy[mine, 1], s=6, color=pal(k % 8), alpha=0.5,
                       label=str(g), linewidths=0)
    else:
        ax.scatter(xy[background, 0], xy[background, 1], s=5, color="0.75", linewidths=0,
                   label="pool")
    cmap = plt.get_cmap("tab10")
    for c in sorted(set(comps.tolist())):
        mine = np.flatnonzero(comps == c)
        pts = xy[idx[mine]]
        color = cmap(c % 10) if c >= 0 else "black"
        ax.scatter(pts[:, 0], pts[:, 1], s=22, facecolors="none", edgecolors=color,
                   linewidths=1.0, label=f"selected, component {c}" if c >= 0 else "selected")
        for a, b in zip(mine[:-1], mine[1:]):
            if steps[b] == "anchor" or c < 0:
                continue
            ax.plot(xy[idx[[a, b]], 0], xy[idx[[a, b]], 1], color=color, lw=0.8,
                    ls="--" if steps[b] == "fallback" else "-", alpha=0.8)
        anchors = [i for i in mine if steps[i] == "anchor"]
        if anchors:
            ax.scatter(xy[idx[anchors], 0], xy[idx[anchors], 1], marker="*", s=120,
                       color=color, edgecolors="black", linewidths=0.5, zorder=4)
    ax.set_xlabel("PC 1 of the unit pool features")
    ax.set_ylabel("PC 2")
    ax.set_title(title or "instruction graph around the selection (walk path per component)")
    ax.legend(fontsize=7, frameon=False, markerscale=1.5, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_budgets(per_component: Sequence[Any], path: str | Path, *,
                 title: str | None = None) -> Path:
    """Per walk (a core-knowledge component, or one pole of it): its budget and the rows the
    walk selected (neighbour and fallback steps stacked)."""
    plt = _pyplot()
    comps = [_as_doc(c) for c in per_component]
    x = np.arange(len(comps))
    budget = np.array([c["budget"] for c in comps], dtype=float)
    fallback = np.array([c.get("fallback_steps", 0) for c in comps], dtype=float)
    selected = np.array([c["selected"] for c in comps], dtype=float)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(comps) + 2), 3.4))
    ax.bar(x - 0.2, budget, 0.38, color="0.7", label="budget")
    ax.bar(x + 0.2, selected - fallback, 0.38, color="tab:blue", label="selected (walk)")
    ax.bar(x + 0.2, fallback, 0.38, bottom=selected - fallback, color="tab:orange",
           label="selected (fallback)")
    pole = {1: "+", -1: "−"}
    ax.set_xticks(x, [f"{c['component']}{pole.get(c.get('pole', 0), '')}\nw={c['weight']:.2f}"
                      for c in comps])
    ax.set_xlabel("core-knowledge component (budget weight)")
    ax.set_ylabel("rows")
    ax.set_title(title or "budget vs achieved per component")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["layout_2d", "plot_budgets", "plot_metric", "plot_walk"]
