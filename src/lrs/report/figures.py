"""The report's own figures (PNG, 150 dpi, one fixed colour per method across every figure).

Why: the headline figures (accuracy, flip matrices, forest plot) must exist for any run, even one without
per-token logs, so they are drawn here from the headline rows; the rectification figures that need token ids
(divergence ECDF, event raster, reward fork, lengths) come from :func:`lrs.analysis.rectify.figures`. When a run
logged steering events but no token ids, :func:`events_figure` still shows where steering fired and the reward
along the traces. Figures use matplotlib's object API on the Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

#: one colour per method, the same in every figure and table swatch
METHOD_COLOURS = {
    "base": "#6f7782",
    "cot": "#8c564b",
    "fewshot": "#bcbd22",
    "lrs": "#1f77b4",
    "lrs-basic": "#17becf",
    "random": "#ff7f0e",
    "diffmean": "#2ca02c",
    "vectors": "#9467bd",
    "lora": "#e377c2",
    "vectors-random": "#d62728",
}
CATEGORY_COLOURS = {"fixed": "#2a9d4a", "broken": "#c0392b", "both_right": "#4a7fb5", "both_wrong": "#999999"}
DPI = 150


def colour(method: str) -> str:
    """The method's colour (a stable fallback for names outside the registry)."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    pool = ["#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5"]
    return pool[sum(map(ord, method)) % len(pool)]


def _figure(w: float, h: float, ncols: int = 1, nrows: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, k + 1) for k in range(nrows * ncols)]
    return fig, axes


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def accuracy(rows: Sequence[dict], path: Path) -> Path:
    """Accuracy per method with its Wilson 95% CI."""
    fig, (ax,) = _figure(max(3.6, 0.8 + 0.75 * len(rows)), 3.0)
    xs = np.arange(len(rows))
    accs = [r["acc"] for r in rows]
    err = [[r["acc"] - r["ci95"][0] for r in rows], [r["ci95"][1] - r["acc"] for r in rows]]
    ax.bar(xs, accs, yerr=err, capsize=4, color=[colour(r["method"]) for r in rows], width=0.65)
    for x, a in zip(xs, accs, strict=True):
        ax.text(x, 0.02, f"{a:.0%}", ha="center", va="bottom", fontsize=8, color="white", fontweight="bold")
    ax.set_xticks(xs, [r["method"] for r in rows])
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def flip_matrices(rows: Sequence[dict], path: Path) -> Path | None:
    """F1: one 2×2 matrix per method vs base (counts and %), titled with Δacc [CI] and the exact McNemar p."""
    from matplotlib.colors import LinearSegmentedColormap

    rows = [r for r in rows if "fixed" in r]
    if not rows:
        return None
    cols = min(4, len(rows))
    nr = math.ceil(len(rows) / cols)
    fig, axes = _figure(3.0 * cols, 2.9 * nr, ncols=cols, nrows=nr)
    for ax, r in zip(axes, rows, strict=False):
        n = r["n"]
        both_right = r["correct"] - r["fixed"]
        both_wrong = n - both_right - r["fixed"] - r["broken"]
        m = np.array([[both_right, r["broken"]], [r["fixed"], both_wrong]])
        cmap = LinearSegmentedColormap.from_list(r["method"], ["#ffffff", colour(r["method"])])
        ax.imshow(m, cmap=cmap, vmin=0, vmax=max(1, m.max()))
        for i in range(2):
            for j in range(2):
                dark = m[i, j] > 0.6 * m.max()
                ax.text(j, i, f"{m[i, j]}\n{m[i, j] / max(1, n):.0%}", ha="center", va="center",
                        fontsize=10, color="white" if dark else "black")  # fmt: skip
        ax.set_xticks([0, 1], ["right", "wrong"], fontsize=8)
        ax.set_yticks([0, 1], ["base\nright", "base\nwrong"], fontsize=8)
        ax.set_xlabel(r["method"], fontsize=9)
        lo, hi = r["delta_ci"]
        ax.set_title(
            f"{r['method']}: Δ {r['delta']:+.1%} [{lo:+.1%}, {hi:+.1%}]\nfixed {r['fixed']} / broken "
            f"{r['broken']}, p={r['mcnemar_p']:.3g}",
            fontsize=8.5,
        )
    for ax in axes[len(rows) :]:
        ax.set_visible(False)
    return _save(fig, path)


def forest(rows: Sequence[dict], path: Path) -> Path | None:
    """F2: Δacc vs base with its 95% CI per method, and the fixed / broken counts beside it."""
    rows = [r for r in rows if "delta" in r]
    if not rows:
        return None
    fig, (a1, a2) = _figure(6.4, max(3.0, 0.55 * len(rows) + 1.5), ncols=2)
    for y, r in enumerate(rows):
        lo, hi = r["delta_ci"]
        c = colour(r["method"])
        a1.errorbar([r["delta"]], [y], xerr=[[r["delta"] - lo], [hi - r["delta"]]], fmt="o", color=c,
                    capsize=4, ms=7, lw=2)  # fmt: skip
        a2.barh([y - 0.18], [r["fixed"]], height=0.34, color=CATEGORY_COLOURS["fixed"],
                label="fixed" if y == 0 else None)  # fmt: skip
        a2.barh([y + 0.18], [r["broken"]], height=0.34, color=CATEGORY_COLOURS["broken"],
                label="broken" if y == 0 else None)  # fmt: skip
        a2.text(r["fixed"], y - 0.18, f" {r['fixed']}", va="center", fontsize=8)
        a2.text(r["broken"], y + 0.18, f" {r['broken']}", va="center", fontsize=8)
    a1.axvline(0, color="#888888", lw=0.8, ls="--")
    names = [r["method"] for r in rows]
    for ax in (a1, a2):
        ax.set_yticks(range(len(rows)), names)
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.spines[["top", "right"]].set_visible(False)
    for t, name in zip(a1.get_yticklabels(), names, strict=True):
        t.set_color(colour(name))
    a1.set_xlabel("accuracy change vs base (95% paired bootstrap CI)")
    a1.xaxis.set_major_formatter(_pct_formatter())
    a2.set_xlabel("problems")
    a2.set_xlim(0, max(1, max(max(r["fixed"], r["broken"]) for r in rows)) * 1.2)
    a2.legend(fontsize=8, loc="lower right")
    return _save(fig, path)


def _pct_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v:+.0%}")


def behaviours(diffs: dict[str, dict], tags: Sequence[str], path: Path) -> Path | None:
    """Δ instances per 1k tokens (method − base, paired bootstrap 95% CI) per tag, one colour per method."""
    diffs = {m: d for m, d in diffs.items() if d}
    if not diffs:
        return None
    fig, (ax,) = _figure(7.0, 0.28 * len(tags) * max(1, len(diffs)) ** 0.5 + 1.1)
    k = len(diffs)
    for j, (m, d) in enumerate(diffs.items()):
        for i, tag in enumerate(tags):
            s = d["tags"][tag]
            if s["n"] == 0 or s["mean_diff"] is None:
                continue
            y = i + (j - (k - 1) / 2) * 0.8 / max(1, k)
            lo, hi = s["mean_diff_ci95"]
            ax.errorbar([s["mean_diff"]], [y], xerr=[[s["mean_diff"] - lo], [hi - s["mean_diff"]]], fmt="o",
                        color=colour(m), ms=5, capsize=2, label=m if i == 0 else None)  # fmt: skip
    ax.axvline(0, color="#888888", lw=0.8, ls="--")
    ax.set_yticks(range(len(tags)), list(tags))
    ax.set_ylim(len(tags) - 0.5, -0.5)
    ax.set_xlabel("Δ instances per 1k tokens, method − base (95% CI)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, loc="best")
    return _save(fig, path)


def _category(b: dict | None, m: dict) -> str:
    if b is None:
        return "both_wrong"
    if m["correct"] and not b["correct"]:
        return "fixed"
    if b["correct"] and not m["correct"]:
        return "broken"
    return "both_right" if b["correct"] else "both_wrong"


def events_figure(base: dict[str, dict], method: dict[str, dict], name: str, path: Path) -> Path | None:
    """Where steering fired (one row per problem, ticks at steered tokens, by outcome category) and the
    mean reward r_t along the traces per category: the view for runs with events but without token ids."""
    rows = []
    for pid, rec in method.items():
        ev = rec.get("events")
        if not isinstance(ev, list) or not ev:
            continue
        rows.append((_category(base.get(pid), rec), [int(e["t"]) for e in ev if e.get("steered")],
                     [(int(e["t"]), e.get("r")) for e in ev]))  # fmt: skip
    if not rows:
        return None
    order = {c: i for i, c in enumerate(CATEGORY_COLOURS)}
    rows.sort(key=lambda r: (order[r[0]], len(r[1])))
    fig, (a1, a2) = _figure(10.5, max(2.8, min(7.0, 0.05 * len(rows) + 2.2)), ncols=2)
    for y, (cat, steered, _) in enumerate(rows):
        a1.plot(steered, [y] * len(steered), "|", color=CATEGORY_COLOURS[cat], ms=3.5)
    for cat, c in CATEGORY_COLOURS.items():
        n = sum(r[0] == cat for r in rows)
        if n:
            a1.plot([], [], "|", color=c, label=f"{cat} ({n})")
    a1.set_xlabel(f"generated token (| = {name} steered it)")
    a1.set_ylabel("problems, by outcome vs base")
    a1.set_ylim(len(rows) - 0.5, -0.5)
    a1.legend(fontsize=7, loc="lower right")
    length = max((t for r in rows for t, _ in r[2]), default=0) + 1
    for cat, c in CATEGORY_COLOURS.items():
        grid = np.full((sum(r[0] == cat for r in rows), length), np.nan)
        for i, r in enumerate([r for r in rows if r[0] == cat]):
            for t, v in r[2]:
                if v is not None:
                    grid[i, t] = v
        if not len(grid):
            continue
        counts = np.isfinite(grid).sum(axis=0)
        mean = np.where(counts > 0, np.nansum(grid, axis=0) / np.maximum(counts, 1), np.nan)
        a2.plot(np.arange(length), mean, color=c, lw=1.2, label=f"{cat} ({len(grid)})")
    a2.set_xlabel("generated token")
    a2.set_ylabel(f"mean reward r_t under {name}")
    a2.set_ylim(0, 1)
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)
