"""Sections 0 (configuration), 1 (headline) and 5 (automatic caveats) of the report.

Why: these sections exist for every run, with or without per-token logs. The numbers come from
:mod:`lrs.report.data` (which calls :mod:`lrs.stats` and :mod:`lrs.analysis.rectify`); this module lays them out
as blocks and decides which caveats a reader must see next to them.
"""

from __future__ import annotations

import html
import json

from lrs.report import figures as F
from lrs.report.blocks import Bullets, Figure, FigureRow, Heading, Para, Raw, Table
from lrs.report.context import Context
from lrs.report.data import MATCHED_CONTROLS, headline, num, pct, run_config, versus_control

#: section anchors and titles, in order (tests check that every one is in the HTML)
SECTIONS = (
    ("config", "0. Configuration"),
    ("headline", "1. Headline"),
    ("rectification", "2. Error rectification"),
    ("behaviours", "3. Behaviours"),
    ("latents", "4. Latents"),
    ("caveats", "5. Caveats"),
)
TITLES = dict(SECTIONS)

DISCORDANT_MIN = 20  #: fewer discordant pairs than this: the McNemar test has little power
N_MIN = 100
TRUNCATION_MAX = 0.10
LENGTH_CHANGE_MAX = 0.20


def _swatch(method: str) -> str:
    return f'<span class="sw" style="background:{F.colour(method)}"></span>'


def config_section(ctx: Context) -> list:
    """Section 0: the configuration block and one row per method (settings, artefacts, what was logged)."""
    cfg = run_config(ctx.results, ctx.eval_dir)
    ctx.summary["config"] = cfg
    v = cfg["versions"] or {}
    items = [
        ("model", cfg["model"]),
        ("layer", cfg["layer"] if cfg["layer"] is not None else "– (encoder file not found)"),
        ("encoder", (cfg["encoder"] or "–")[:16]),
        ("reward model", (cfg["reward"] or "–")[:16]),
        ("K", cfg["k"]),
        ("α", cfg["alpha"]),
        (
            "τ_r",
            cfg["tau_r"] if cfg["tau_r_quantile"] is None else f"{cfg['tau_r']} (q={cfg['tau_r_quantile']})",
        ),
        ("τ_c", cfg["tau_c"]),
        ("gate / warmup / every", f"{cfg['gate']} / {cfg['warmup']} / {cfg['every']}"),
        ("task / split", f"{cfg['task']} / {cfg['split']}"),
        ("n", cfg["n"]),
        ("seed / split seed", f"{cfg['seed']} / {cfg['split_seed']}"),
        ("dtype / device", f"{cfg['dtype']} / {cfg['device']}"),
        ("batch / max new tokens", f"{cfg['batch_size']} / {cfg['max_new_tokens']}"),
        (
            "lrs / torch / transformers",
            f"{v.get('lrs', '?')} / {v.get('torch', '?')} / {v.get('transformers', '?')}",
        ),
        ("git", cfg["git"]),
        ("tagger lexicon", f"v{cfg['lexicon_version']} {cfg['lexicon_sha256'][:16]}"),
    ]
    grid = "".join(f"<div><b>{html.escape(k)}</b><span>{html.escape(str(x))}</span></div>" for k, x in items)
    md = "\n".join(f"- {k}: `{x}`" for k, x in items)
    rows = [
        [f"{r['method']}", num(r["n"], "d"), r["kind"], num(r["k"], "d"), num(r["alpha"]), num(r["tau_r"]),
         num(r["tau_c"]), r["artefacts"] or "–", r["logged"], f"`{r['cache_key']}`"]
        for r in cfg["methods"]
    ]  # fmt: skip
    blocks: list = [
        Heading(2, TITLES["config"], "config"),
        Raw(f'<div class="cfg">{grid}</div>', md),
        Table(
            ["method", "n", "steerer", "K", "α", "τ_r", "τ_c", "artefacts", "logged", "cache key"],
            rows,
            csv="config-methods.csv",
            numeric=False,
        ),  # fmt: skip
        Para("Versions: `" + json.dumps(v) + "`", kind="note"),
    ]
    if cfg["mixed"]:
        msg = f"the methods' results differ in {', '.join(cfg['mixed'])}: they are not one controlled comparison"
        ctx.caveats.append(msg)
        blocks.append(Para("Warning: " + msg + ".", kind="warn"))
    return blocks


def _sampled(ctx) -> str:
    """Best-of-N results are not greedy: say so where the headline says "greedy decoding"."""
    s = next((r["summary"] for r in ctx.results.values() if r["summary"].get("method") == "bon"), None)
    return f" (bon: the pick among {s['samples_per_problem']} samples at T = {s['temperature']})" if s else ""


def _row_cells(r: dict) -> list[str]:
    lo, hi = r["ci95"]
    delta = fixed = broken = p = ""
    if "delta" in r:
        dlo, dhi = r["delta_ci"]
        delta = f"{pct(r['delta'], signed=True)} [{pct(dlo, signed=True)}, {pct(dhi, signed=True)}]"
        fixed, broken, p = str(r["fixed"]), str(r["broken"]), f"{r['mcnemar_p']:.3g}"
    elif "compare_error" in r:
        delta = "not paired"
    return [
        r["method"], str(r["n"]), f"{pct(r['acc'])} [{pct(lo)}, {pct(hi)}]", delta, fixed, broken, p,
        f"{r['mean_tokens']:.0f}", pct(r["truncated"]), pct(r["boxed"]), pct(r["steer_rate"]),
        num(r["events_per_problem"], ".1f"), num(r["s_per_problem"], ".2f"),
    ]  # fmt: skip


#: what each matched control holds fixed, for the sentence under the headline table
CONTROL_MATCH = {
    "lrs": "same gate, same |Δz| in latent space, same decoder span and |Δh|, random direction",
    "vectors": "random vectors with the trained per-layer norms",
}

HEADLINE_HEADER = [
    "method", "n", "acc [95% CI]", "Δ vs base [95% CI]", "fixed", "broken", "McNemar p", "mean tokens",
    "% truncated", "% boxed", "% tokens steered", "events/problem", "s/problem",
]  # fmt: skip
HEADLINE_CSV = [
    "method", "n", "correct", "accuracy", "ci_lo", "ci_hi", "delta", "delta_lo", "delta_hi", "fixed", "broken",
    "mcnemar_p", "mde", "mean_tokens", "truncated", "boxed", "steer_rate", "events_per_problem", "s_per_problem",
]  # fmt: skip


def _csv_row(r: dict) -> list:
    dci = r.get("delta_ci") or [None, None]
    return [r["method"], r["n"], r["correct"], r["acc"], *r["ci95"], r.get("delta"), *dci, r.get("fixed"),
            r.get("broken"), r.get("mcnemar_p"), r.get("mde"), r["mean_tokens"], r["truncated"], r["boxed"],
            r["steer_rate"], r["events_per_problem"], r["s_per_problem"]]  # fmt: skip


def _glance(rows: list[dict], vc: dict | None) -> str:
    tiles = []
    for r in rows:
        sub = (
            f"Δ {pct(r['delta'], signed=True)} · fixed {r['fixed']} / broken {r['broken']} · p {r['mcnemar_p']:.2g}"
            if "delta" in r
            else f"{r['correct']}/{r['n']} right"
        )
        tiles.append(
            f'<div style="--c:{F.colour(r["method"])}">{_swatch(r["method"])}{html.escape(r["method"])}'
            f"<b>{pct(r['acc'])}</b><small>{html.escape(sub)}</small></div>"
        )
    if vc is not None:
        tiles.append(
            f'<div style="--c:#444">{html.escape(vc["method"])} vs {html.escape(vc["control"])}'
            f"<b>{vc['net_fixes_method']:+d} vs {vc['net_fixes_control']:+d}</b>"
            f"<small>net fixes · McNemar p {vc['mcnemar_p']:.2g}</small></div>"
        )
    return '<div class="glance">' + "".join(tiles) + "</div>"


def headline_section(ctx: Context) -> list:
    """Section 1: the headline table, LRS vs its matched control, the minimum detectable effect, F1 and F2."""
    rows = headline(ctx.results, base=ctx.base or "base")
    vc = versus_control(ctx.results)
    ctx.summary["headline"] = rows
    ctx.summary["method_vs_control"] = vc
    n = max(r["n"] for r in rows)
    width = max(r["ci95"][1] - r["ci95"][0] for r in rows)
    split = ctx.summary["config"]["split"]
    blocks: list = [
        Heading(2, TITLES["headline"], "headline"),
        Raw(_glance(rows, vc)),
        Para(
            f"n = {n} {split} problems, greedy decoding{_sampled(ctx)}. A 95% CI is about ±{100 * width / 2:.0f} points wide at this n, so "
            "differences smaller than that are not evidence. Steering settings were chosen on the dev split only."
        ),
        Table(
            HEADLINE_HEADER,
            [_row_cells(r) for r in rows],
            csv="headline.csv",
            csv_rows=[_csv_row(r) for r in rows],
            csv_header=HEADLINE_CSV,
        ),  # fmt: skip
        Para(
            "acc: Wilson 95% CI. Δ: paired bootstrap over problems (10,000 resamples). Fixed = wrong under base and "
            "right under the method, broken = the reverse; p = exact two-sided McNemar test on those discordant "
            "problems. % tokens steered and events/problem count steering events (latent methods); s/problem is "
            "the wall time of the generating process divided by n.",
            kind="note",
        ),
    ]
    if ctx.base is None:
        ctx.missing.append(
            "no base result: Δ, fixed/broken and every paired analysis need `lrs eval --method base`"
        )
        blocks.append(Para("There is no base result, so nothing is paired: run `lrs eval --method base` with "
                           "the same flags.", kind="missing"))  # fmt: skip
    mde_lines = []
    for r in rows:
        if "delta" not in r:
            continue
        if r["discordant"] == 0:
            mde_lines.append(f"**{r['method']}**: no discordant problems, so no change was detected and the "
                             "detectable effect is undefined.")  # fmt: skip
        elif r["mde"] is None:
            mde_lines.append(f"**{r['method']}**: with only {r['discordant']} discordant problems no split of them "
                             "reaches 80% power at α = 0.05: no effect is detectable at this n.")  # fmt: skip
        else:
            mde_lines.append(
                f"**{r['method']}**: {r['discordant']} discordant problems ({r['discordant'] / r['n']:.1%}): "
                f"the exact McNemar test detects a net change of {pct(r['mde'])} with 80% power at α = 0.05 "
                f"(`lrs.stats.mcnemar_mde`); the observed Δ is {pct(r['delta'], signed=True)}."
            )
    if vc is not None:
        m, c = vc["method"], vc["control"]
        verdict = (
            f"{m} has more net fixes than its control"
            if vc["net_fixes_method"] > vc["net_fixes_control"]
            else f"{m} does not beat its matched control on net fixes"
        )
        mde = f"; detectable difference at this discordance {pct(vc['mde'])}" if vc["mde"] is not None else ""
        blocks.append(
            Para(
                f"**{m} vs its matched random control `{c}`** ({CONTROL_MATCH.get(m, 'matched')}): net "
                f"fixes vs base {vc['net_fixes_method']:+d} vs {vc['net_fixes_control']:+d}; right only under {m} "
                f"{vc['method_only_right']}, only under {c} {vc['control_only_right']}, exact McNemar p = "
                f"{vc['mcnemar_p']:.3g}{mde}. {verdict}."
            )
        )
    elif ctx.primary in MATCHED_CONTROLS:
        m, c = ctx.primary, MATCHED_CONTROLS[ctx.primary]
        ctx.missing.append(f"no matched random control: `lrs eval --method {c}` with {m}'s settings")
        blocks.append(Para(f"No matched `{c}` control run: without it, a gain of {m} cannot be told apart from "
                           f"the effect of perturbing the model by as much. Add `lrs eval --method {c}`.",
                           kind="missing"))  # fmt: skip
    if mde_lines:
        blocks += [Heading(3, "Minimum detectable effect"), *[Para(x) for x in mde_lines]]
    acc = F.accuracy(rows, ctx.fig("accuracy.png"))
    forest = F.forest(rows, ctx.fig("F2-forest.png"))
    flips = F.flip_matrices(rows, ctx.fig("F1-flips.png"))
    row = [Figure(f"figures/{acc.name}", "accuracy per method (Wilson 95% CI)")]
    if forest is not None:
        row.append(
            Figure(f"figures/{forest.name}", "F2: Δ accuracy vs base (95% CI) and fixed / broken counts")
        )
    blocks.append(FigureRow(row))
    if flips is not None:
        blocks.append(
            Figure(f"figures/{flips.name}", "F1: flip matrices vs base (rows: base, columns: method)")
        )
    _headline_caveats(ctx, rows)
    return blocks


def _headline_caveats(ctx: Context, rows: list[dict]) -> None:
    base = next((r for r in rows if r["method"] == ctx.base), None)
    n = max(r["n"] for r in rows)
    if n < N_MIN:
        ctx.caveats.append(
            f"n = {n} problems (< {N_MIN}): every accuracy CI is wide; treat differences as anecdotes"
        )
    for r in rows:
        if "discordant" in r and r["discordant"] < DISCORDANT_MIN:
            mde = (
                f"; the smallest detectable net change here is {pct(r['mde'])}"
                if r["mde"] is not None
                else ""
            )
            ctx.caveats.append(
                f"{r['method']} vs base: b + c = {r['discordant']} discordant problems (< {DISCORDANT_MIN}): the "
                f"exact McNemar test has little power{mde}"
            )
        if r["truncated"] > TRUNCATION_MAX:
            ctx.caveats.append(
                f"{r['method']}: {pct(r['truncated'])} of the traces hit the token budget (> {TRUNCATION_MAX:.0%}): "
                "accuracy partly measures length; raise --max-new-tokens"
            )
        if base is not None and r is not base and base["mean_tokens"] > 0:
            change = r["mean_tokens"] / base["mean_tokens"] - 1
            if abs(change) > LENGTH_CHANGE_MAX:
                ctx.caveats.append(
                    f"{r['method']}: mean length {r['mean_tokens']:.0f} tokens vs base {base['mean_tokens']:.0f} "
                    f"({change:+.0%}, more than ±{LENGTH_CHANGE_MAX:.0%}): compare behaviour rates per 1k tokens, "
                    "and check the truncation rates"
                )
        if "compare_error" in r:
            ctx.caveats.append(f"{r['method']} is not paired with base: {r['compare_error']}")
        if r["resumed"]:
            ctx.caveats.append(f"{r['method']} was resumed: its s/problem covers only the last process")


def caveats_section(ctx: Context) -> list:
    """Section 5: every automatic caveat gathered by the other sections, then what is missing and how to add it."""
    blocks: list = [Heading(2, TITLES["caveats"], "caveats")]
    seen = list(dict.fromkeys(ctx.caveats))
    ctx.summary["caveats"] = seen
    ctx.summary["missing"] = list(dict.fromkeys(ctx.missing))
    if seen:
        blocks.append(Bullets(seen, kind="warn"))
    else:
        blocks.append(Para("No automatic caveat applies."))
    if ctx.summary["missing"]:
        blocks += [Heading(3, "Missing inputs and how to add them"), Bullets(ctx.summary["missing"])]
    return blocks
