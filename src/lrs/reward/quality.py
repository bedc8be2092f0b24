"""The honest quality report: AUROC at absolute positions vs confidence and prompt-only baselines, CIs."""

from __future__ import annotations

import math

import numpy as np

from lrs.reward.model import (
    BASELINES,
    POSITIONS,
    PROBE_C,
    _aucs_at,
    _keys,
    _prefix_scores,
    _val_score,
)
from lrs.stats import grouped_auroc_ci, within_group_auroc

# within-problem AUROC is reported at these positions (the t = 32/64/128) and after the last token
WITHIN_KEYS = ("32", "64", "128", "end")


# ---- the quality report ----------------------------------------------------------------------------------
def _probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray) -> np.ndarray | None:
    """Standardised L2 logistic regression with fixed C; None when the train side has a single class."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(x_tr) < 2 or len(set(y_tr.tolist())) < 2 or len(x_va) == 0:
        return None
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=2000))
    return clf.fit(x_tr, y_tr).decision_function(x_va)


def _quality(rm, xs, y, groups, tr, va, conf, prompt) -> dict:
    """Val AUROC at absolute positions of the reward model and the baselines, plus within-problem AUROC."""
    keys, max_len = _keys(), rm.cfg.max_len
    cut = {str(t): t for t in POSITIONS} | {"end": max_len}
    lens = np.array([len(z) for z in xs])  # already truncated to max_len
    has = {k: lens[va] > cut[k] if k != "end" else np.ones(len(va), bool) for k in keys}
    has_tr = {k: lens[tr] > cut[k] if k != "end" else np.ones(len(tr), bool) for k in keys}
    scores = {"reward": _prefix_scores(rm, [xs[i] for i in va])}
    if conf is not None:  # mean top-token probability over the first t tokens
        mc = {k: np.array([float(c[: min(cut[k], max_len)].float().mean()) for c in conf]) for k in keys}
        scores["confidence"] = {k: np.where(has[k], mc[k][va], np.nan) for k in keys}
    if prompt is not None:  # probes trained on the train traces, scored on the val traces
        p = np.stack([x.detach().float().cpu().numpy().reshape(-1) for x in prompt])
        s = _probe(p[tr], y[tr], p[va])
        scores["prompt"] = {
            k: np.where(has[k], s, np.nan) if s is not None else np.full(len(va), np.nan) for k in keys
        }
        if conf is not None:
            scores["prompt_conf"] = {}
            for k in keys:
                x = np.column_stack([p, mc[k]])
                v = np.full(len(va), np.nan)
                s = _probe(x[tr][has_tr[k]], y[tr][has_tr[k]], x[va][has[k]])
                if s is not None:
                    v[has[k]] = s
                scores["prompt_conf"][k] = v
    y_va, g_va = y[va], [groups[i] for i in va]
    report = dict(
        kind=rm.cfg.kind,
        n_latents=rm.n_latents,
        window=rm.cfg.window if rm.cfg.kind == "causal" else None,
        n_train=len(tr),
        n_val=len(va),
        n_train_problems=len({groups[i] for i in tr}),
        n_val_problems=len(set(g_va)),
        pos_frac_train=float(y[tr].mean()),
        pos_frac_val=float(y_va.mean()),
        positions=list(POSITIONS),
        probe_c=PROBE_C,
        n_val_at={k: int(has[k].sum()) for k in keys},
        auroc={name: _aucs_at(s, y_va) for name, s in scores.items()},
        within={},
    )
    report["val_score"] = _val_score(report["auroc"]["reward"])
    report["ci64"] = _ci64(scores, y_va, g_va)
    for name in ("reward", "confidence"):
        if name in scores:
            report["within"][name] = {}
            for k in WITHIN_KEYS:
                m = has[k]
                g = [gi for gi, ok in zip(g_va, m, strict=True) if ok]
                v, pairs, used = within_group_auroc(scores[name][k][m], y_va[m], g)
                ci = grouped_auroc_ci(scores[name][k][m], y_va[m], g, within=True) if pairs else None
                report["within"][name][k] = dict(auroc=v, pairs=pairs, groups=used, ci=ci)
    if "confidence" in scores:  # paired: the same problems resampled for both scores
        report["within"]["reward-confidence"] = {}
        for k in WITHIN_KEYS:
            m = has[k] & ~np.isnan(scores["confidence"][k])
            g = [gi for gi, ok in zip(g_va, m, strict=True) if ok]
            r, c = scores["reward"][k][m], scores["confidence"][k][m]
            ci = grouped_auroc_ci(r, y_va[m], g, within=True, minus=c)
            report["within"]["reward-confidence"][k] = dict(ci=list(ci))
    return report


def _ci64(scores: dict, y_va: np.ndarray, g_va: list) -> dict:
    """95% CIs at t=64, resampling val problems: each score's AUROC, and reward minus each baseline."""
    out: dict = {}
    r = scores["reward"]["64"]
    for name, s in scores.items():
        m = ~np.isnan(s["64"]) & ~np.isnan(r)
        g = [gi for gi, ok in zip(g_va, m, strict=True) if ok]
        out[name] = list(grouped_auroc_ci(s["64"][m], y_va[m], g))
        if name != "reward":
            out[f"reward-{name}"] = list(grouped_auroc_ci(r[m], y_va[m], g, minus=s["64"][m]))
    return out


def _num(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def verdict(report: dict) -> str:
    """One plain sentence: does the reward model beat the best baseline at t=64?"""
    a = report["auroc"]
    rm = _num(a["reward"].get("64"))
    base = {n: _num(a[n].get("64")) for n in BASELINES if n in a}
    base = {n: v for n, v in base.items() if v is not None}
    if rm is None:
        n = report.get("n_val_at", {}).get("64", 0)
        return (
            f"cannot judge at t=64: the {n} val traces longer than 64 tokens do not hold both labels; "
            "collect more traces or sample several per problem"
        )
    if not base:
        return f"reward model AUROC at t=64 is {rm:.2f}; no baseline to compare (pass conf and prompt)"
    name = max(base, key=base.get)
    w64 = report.get("within", {}).get("reward", {}).get("64", {})
    w, lo = _num(w64.get("auroc")), _num((w64.get("ci") or [None])[0])
    if w is None:
        within = ""
    elif lo is None:
        within = f"; within-problem AUROC at t=64 {w:.2f} (0.5 = chance)"
    else:
        within = f"; within-problem AUROC at t=64 {w:.2f} {_fmt_ci(w64['ci'])}: " + (
            "above chance, so it does rank a problem's own traces"
            if lo > 0.5
            else "not distinguishable from chance"
        )
    if rm > base[name]:
        lo = _num((report.get("ci64", {}).get(f"reward-{name}") or [None])[0])
        if lo is not None and lo <= 0:
            return (
                f"reward model scores above the best baseline ({BASELINES[name]}) at t=64 ({rm:.2f} vs "
                f"{base[name]:.2f}) but not significantly: the 95% CI of the difference includes 0{within}"
            )
        return f"reward model beats the best baseline ({BASELINES[name]}) at t=64 ({rm:.2f} vs {base[name]:.2f}){within}"
    why = (
        "it adds nothing over the model's own confidence"
        if name == "confidence"
        else "its signal is mostly problem difficulty"
    )
    return f"reward model does NOT beat the {BASELINES[name]} baseline at t=64 ({rm:.2f} vs {base[name]:.2f}): {why}; steering may not help{within}"


def _fmt(v) -> str:
    return "-" if _num(v) is None else f"{v:.3f}"


def format_report(report: dict) -> str:
    """A compact plain-text table of val AUROC by absolute position and baseline, CIs at t=64 and the
    verdict; the same again for the held-out trace set when there is one."""
    head = (
        f"reward model {report['kind']} on {report['n_latents']} latents: train {report['n_train']} traces "
        f"({report['n_train_problems']} problems, {report['pos_frac_train']:.0%} correct), report set "
        f"{report['n_val']} traces ({report['n_val_problems']} problems, {report['pos_frac_val']:.0%} correct), "
        f"epoch {report.get('best_epoch', '?')} of {report.get('epochs_run', '?')} selected on "
        f"{(report.get('selected_on') or {}).get('n_problems', '?')} other problems at t="
        f"{'/'.join(str(t) for t in (report.get('selected_on') or {}).get('positions', []))}"
    )
    lines = [head, f"objective: {report.get('objective', 'trajectory')}", *_table(report, "report AUROC")]
    vf = report.get("value_fit")
    if vf:
        lines.append(
            f"value fit on the report traces' rollout labels ({vf['n_points']} prefixes): Pearson r "
            f"{vf['pearson']:.2f}, Brier {vf['brier']:.3f} (constant predictor {vf['brier_constant']:.3f})"
        )
    h = report.get("heldout")
    if h:
        lines.append(
            f"held-out traces: {h['n_val']} traces on {h['n_val_problems']} other problems "
            f"({h['pos_frac_val']:.0%} correct), scored by the same model and probes"
        )
        lines += _table(h, "held-out AUROC")
    return "\n".join(lines)


def _table(report: dict, title: str) -> list[str]:
    keys = [str(t) for t in report["positions"]] + ["end"]
    cols = [f"t={k}" if k != "end" else "end" for k in keys] + [f"within@{k}" for k in WITHIN_KEYS]
    row = lambda label, vals: f"{label:14s}" + "".join(f"{v:>11s}" for v in vals)  # noqa: E731
    lines = [row(title, cols)]
    for name, label in (("reward", "reward model"), *BASELINES.items()):
        if name in report["auroc"]:
            w = report["within"].get(name, {})
            vals = [report["auroc"][name].get(k) for k in keys] + [
                w.get(k, {}).get("auroc") for k in WITHIN_KEYS
            ]
            lines.append(row(label, [_fmt(v) for v in vals]))
    w = report["within"].get("reward", {})
    pairs = [f"{w[k]['pairs']}p/{w[k]['groups']}g" if k in w else "-" for k in WITHIN_KEYS]
    lines.append(row("n traces", [str(report["n_val_at"][k]) for k in keys] + pairs))
    ci = report.get("ci64") or {}
    if ci:
        parts = [f"reward {_fmt_ci(ci.get('reward'))}"] + [
            f"reward - {label} {_fmt_ci(ci.get(f'reward-{name}'), signed=True)}"
            for name, label in BASELINES.items()
            if f"reward-{name}" in ci
        ]
        w64 = report["within"].get("reward", {}).get("64", {})
        if w64.get("ci"):
            parts.append(f"within-problem reward {_fmt_ci(w64['ci'])}")
        wd = report["within"].get("reward-confidence", {}).get("64", {})
        if wd.get("ci"):
            parts.append(f"within-problem reward - confidence {_fmt_ci(wd['ci'], signed=True)}")
        lines.append("95% CI at t=64 (resampling problems): " + "; ".join(parts))
    diff = report["within"].get("reward-confidence", {})
    within_ci = [
        f"t={k}: reward {_fmt_ci(w[k]['ci'])}, reward - confidence {_fmt_ci(diff[k].get('ci'), signed=True)}"
        for k in WITHIN_KEYS
        if k != "64" and (w.get(k) or {}).get("ci") and k in diff
    ]
    if within_ci:
        lines.append("within-problem 95% CI: " + "; ".join(within_ci))
    lines.append("verdict: " + (report.get("verdict") or verdict(report)))
    return lines


def _fmt_ci(ci, signed: bool = False) -> str:
    if not ci or any(_num(v) is None for v in ci):
        return "[-]"
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if signed else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
