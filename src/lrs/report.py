"""Markdown report with plots for a run's evaluation results (accuracy with CIs, steer rate, reward traces)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lrs.artifacts import atomic_write_text  # noqa: E402
from lrs.errors import LRSError  # noqa: E402
from lrs.evaluate import compare, load_result  # noqa: E402
from lrs.steering import METHODS  # noqa: E402


def load_results(eval_dir: Path) -> dict[str, dict]:
    """All method results in an eval directory, in a fixed method order."""
    found = {}
    for name in METHODS:
        res = load_result(eval_dir, name)
        if res is not None:
            found[name] = res
    if not found:
        raise LRSError(f"no results in {eval_dir}: run `lrs eval` (or `lrs demo`) first")
    return found


def results_table(results: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """Rows of the results table: accuracy with CI, paired comparison against base, tokens, steer rate."""
    base = results.get("base")
    rows = []
    for name, res in results.items():
        s = res["summary"]
        row = dict(
            method=name,
            n=s["n"],
            acc=s["accuracy"],
            lo=s["ci95"][0],
            hi=s["ci95"][1],
            tokens=s["mean_tokens"],
            wall=s["wall_time_s"],
            steer=s.get("steering", {}).get("steer_rate"),
        )
        if base is not None and name != "base":
            try:
                row.update(compare(base, res))
            except LRSError:
                pass
        rows.append(row)
    lines = [
        "| method | n | accuracy (95% CI) | Δ vs base | fixed / broken | McNemar p | mean tokens | steer rate | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = f"{r['delta']:+.1%}" if "delta" in r else ""
        fb = f"{r['fixed']} / {r['broken']}" if "fixed" in r else ""
        p = f"{r['mcnemar_p']:.3g}" if "mcnemar_p" in r else ""
        steer = f"{r['steer']:.1%}" if r["steer"] is not None else ""
        lines.append(
            f"| {r['method']} | {r['n']} | {r['acc']:.1%} ({r['lo']:.1%}–{r['hi']:.1%}) | {delta} | {fb} | {p} "
            f"| {r['tokens']:.0f} | {steer} | {r['wall']:.0f} |"
        )
    return lines, rows


def _plot_accuracy(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    xs = range(len(rows))
    accs = [r["acc"] for r in rows]
    err = [[r["acc"] - r["lo"] for r in rows], [r["hi"] - r["acc"] for r in rows]]
    ax.bar(
        xs, accs, yerr=err, capsize=4, color=["#888" if r["method"] == "base" else "#3b7dd8" for r in rows]
    )
    ax.set_xticks(list(xs), [r["method"] for r in rows])
    ax.set_ylabel("accuracy (95% Wilson CI)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_steer_rate(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if r["steer"] is not None]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(range(len(rows)), [r["steer"] for r in rows], color="#d8853b")
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_ylabel("share of generated tokens steered")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_reward(results: dict[str, dict], path: Path) -> bool:
    """Reward probability over generated tokens under LRS, for problems LRS fixed vs broke vs others."""
    lrs, base = results.get("lrs"), results.get("base")
    if lrs is None or base is None or not any("events" in r for r in lrs["records"]):
        return False
    before = {r["id"]: r["correct"] for r in base["records"]}
    groups = {"fixed": [], "broken": [], "unchanged": []}
    for r in lrs["records"]:
        if "events" not in r:
            continue
        g = (
            "fixed"
            if r["correct"] and not before[r["id"]]
            else "broken"
            if before[r["id"]] and not r["correct"]
            else "unchanged"
        )
        groups[g].append([e["r"] for e in r["events"]])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    colors = {"fixed": "#2a9d4a", "broken": "#c0392b", "unchanged": "#bbbbbb"}
    for g, curves in groups.items():
        for i, c in enumerate(curves):
            ax.plot(
                c,
                color=colors[g],
                alpha=0.25 if g == "unchanged" else 0.8,
                lw=0.8,
                label=f"{g} ({len(curves)})" if i == 0 else None,
            )
    ax.set_xlabel("generated token")
    ax.set_ylabel("reward probability r_t")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(eval_dir: Path, out: Path | None = None, extra: list[str] | None = None) -> Path:
    """Write ``<out>/report.md`` and its PNG plots from the results in ``eval_dir``; returns the report path.

    ``out`` defaults to ``eval_dir``. Each method's artefact hashes are listed, so a report that mixes
    results of different encoders or reward models shows it.
    """
    eval_dir = Path(eval_dir)
    split = eval_dir.name
    results = load_results(eval_dir)
    lines, rows = results_table(results)
    s0 = next(iter(results.values()))["summary"]
    out = Path(out) if out is not None else eval_dir
    out.mkdir(parents=True, exist_ok=True)
    _plot_accuracy(rows, out / "accuracy.png")
    _plot_steer_rate(rows, out / "steer_rate.png")
    has_reward = _plot_reward(results, out / "reward_trace.png")
    n = s0["n"]
    width = max((r["hi"] - r["lo"] for r in rows), default=0)
    md = [
        f"# Latent Reward Steering: {s0.get('task', '?')} / {split}",
        "",
        f"Model `{s0['model']}` ({s0['dtype']}), greedy, {s0['max_new_tokens']} new tokens, batch {s0['batch_size']}, "
        f"seed {s0['seed']}. n = {n} {split} problems: a 95% CI is about ±{width / 2:.0%} wide at this n, so "
        "differences smaller than that are not evidence. Steering settings were chosen on the dev split only.",
        "",
        *lines,
        "",
        "Fixed = wrong under base and right under the method; broken = the reverse; p = exact two-sided McNemar "
        "test on those discordant problems.",
        "",
        "![accuracy](accuracy.png)",
    ]
    if (out / "steer_rate.png").exists():
        md += ["", "![steer rate](steer_rate.png)"]
    if has_reward:
        md += [
            "",
            "Reward probability along each LRS trace (fixed vs broken vs unchanged problems):",
            "",
            "![reward](reward_trace.png)",
        ]
    if extra:
        md += ["", *extra]
    md += ["", "Artefacts behind each result (hash prefixes; a result is reused only when all match):", ""]
    for name, res in results.items():
        st = (res["summary"].get("key_parts") or {}).get("steerer") or {}
        arts = ", ".join(f"{k} {str(v)[:12]}" for k, v in st.items() if k in ("encoder", "reward", "vectors"))
        md.append(
            f"- {name}: cache key `{res['summary'].get('cache_key', '?')}`" + (f"; {arts}" if arts else "")
        )
    md += ["", "Versions: `" + json.dumps(s0.get("versions", {})) + "`", ""]
    path = atomic_write_text(out / "report.md", "\n".join(md))
    return path
