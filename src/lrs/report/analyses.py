"""Sections 2 (error rectification, with the trace-diff cards), 3 (behaviours) and 4 (latents) of the report.

Why: these sections are the post-hoc analyses of ``lrs analyze``; the report calls their public functions
(:func:`lrs.analysis.rectify.rectify`, ``compare_runs``, ``figures``; :func:`lrs.analysis.behaviours.validate`;
:func:`lrs.analysis.behaviour_stats.behaviour_diff`) and includes ``latents.md`` as written by
``lrs analyze latents``. No statistic is recomputed here. Each section degrades to one line that says what is
missing and which command adds it, so a run with only base and LRS summaries still gives a whole report.
"""

from __future__ import annotations

from pathlib import Path

from lrs.analysis import rectify as R
from lrs.analysis.behaviour_stats import behaviour_diff, keyed_traces
from lrs.analysis.behaviours import TAGS, validate
from lrs.errors import LRSError
from lrs.report import cards as C
from lrs.report import figures as F
from lrs.report.blocks import Details, Figure, FigureRow, Heading, Included, Para, Pre, Raw, Table
from lrs.report.context import Context
from lrs.report.data import has_events, has_tokens, num, pct, run_root
from lrs.report.overview import TITLES

PRECISION_FLOOR, RECALL_FLOOR = 0.8, 0.6  #: ANALYSES §2.4: warn below these on the validation set
BASE_RATE_MIN = 0.05  #: a tag in fewer base traces than this sits at a floor


def _commands(ctx: Context) -> str:
    cfg = ctx.summary.get("config", {})
    flags = f"--task {cfg.get('task') or 'TASK'} --split {cfg.get('split') or 'test'}"
    e = ctx.eval_dir
    return "\n".join([
        f"lrs eval --method base   --shadow     {flags} ...   # token ids, top-2 probabilities, per-token reward",
        f"lrs eval --method lrs    --log-tokens {flags} ...   # + every steering event",
        f"lrs eval --method random --log-tokens {flags} ...   # the matched control",
        f"lrs eval --method base   --log-tokens --batch-size 3 --out {e}/noise {flags} ...   # noise floor",
        f"lrs report {flags}",
    ])  # fmt: skip


# ---- section 2: error rectification -----------------------------------------------------------------------


def _noise(ctx: Context) -> dict[str, dict] | None:
    path = ctx.noise or ctx.eval_dir / "noise" / "base.jsonl"
    if not path.exists():
        return None
    try:
        return R.load_records(path)
    except LRSError as e:
        ctx.caveats.append(f"noise run not used: {e}")
        return None


def _token_text(ctx: Context, methods: list[str]):
    """Token id → its text for the flip table: the tokenizer's decode when given, else the ``token_strs`` the
    records carry (None keeps rectify's ``#id``)."""
    if ctx.decode is not None:
        return lambda t: repr(ctx.decode([t]))
    known: dict[int, str] = {}
    for m in methods:
        for r in ctx.records[m].values():
            if isinstance(r.get("token_strs"), list) and len(r["token_strs"]) == len(r["token_ids"]):
                known.update(zip(r["token_ids"], r["token_strs"], strict=True))
    return (lambda t: repr(known[t]) if t in known else f"#{t}") if known else None


def _category_rows(runs: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for name, r in runs:
        c = r["categories"]
        rows.append([name, str(r["n"]), num(r["nondeterministic"], "d"), str(r["comparison"]["fixed"]),
                     str(r["comparison"]["broken"]), f"{r['net_fixes']:+d}",
                     *[str(c[cat].get(sub, 0)) for cat, sub in (
                         ("both_right", "unchanged"), ("both_right", "diverged"), ("both_wrong", "unchanged"),
                         ("both_wrong", "same_answer"), ("both_wrong", "different_answer"))]])  # fmt: skip
    return rows


def _divergence_rows(runs: list[tuple[str, dict]]) -> list[list[str]]:
    rows = []
    for name, r in runs:
        v = r["divergence"]
        excl = pct(r["nondeterministic"] / r["n"]) if r["nondeterministic"] is not None and r["n"] else "–"
        rows.append([name, str(v["unchanged"]), str(v["diverged"]), str(v["length_only"]), excl,
                     num(v["median_d"], ".0f"), num(v["median_d_rel"], ".2f"), num(v["median_lag"], ".0f"),
                     f"{v['lag0']}/{v['with_lag']}" if v["with_lag"] else "–", num(v["mean_events_to_d"], ".1f"),
                     num(v["median_margin"], ".3f")])  # fmt: skip
    return rows


def _by_category_rows(runs: list[tuple[str, dict]], key: str, cols: tuple[str, ...]) -> list[list[str]]:
    return [
        [name, cat, *[str(counts.get(c, 0)) for c in cols]]
        for name, r in runs
        for cat, counts in sorted(r[key].items())
    ]


PAIR_FIELDS = ("id", "category", "subcategory", "base_pred", "method_pred", "d", "length_only", "d_rel",
               "base_tokens", "method_tokens", "e1", "events_to_d", "lag", "margin", "flip", "nondeterministic",
               "change", "error_type", "corrected_in_place", "preemptive")  # fmt: skip


def _pair_row(p: dict) -> list:
    return [" → ".join(p["flip"]) if k == "flip" and p.get("flip") else p.get(k) for k in PAIR_FIELDS]


def _rectify_blocks(ctx: Context, logged: list[str]) -> list:
    base = ctx.records[ctx.base]
    primary = ctx.primary if ctx.primary in logged else logged[0]
    control = ctx.control if primary == ctx.primary and ctx.control in logged else None
    if primary != ctx.primary:
        ctx.caveats.append(f"rectification follows {primary}: {ctx.primary} was run without --log-tokens")
    noise = _noise(ctx)
    show = _token_text(ctx, [ctx.base, *logged])
    names = dict(base="base", method=primary, control=control or "control", noise="noise (base rerun)")
    try:
        result = R.rectify(base, ctx.records[primary], ctx.records[control] if control else None, noise,
                           names=names, show=show)  # fmt: skip
        others = [
            (m, R.compare_runs(base, ctx.records[m], show)) for m in logged if m not in (primary, control)
        ]
    except LRSError as e:
        ctx.caveats.append(f"rectification skipped: {e}")
        return [Para(f"Rectification could not pair the runs: {e}", kind="missing")]
    for name, r in others:
        r["name"] = name
    runs = [(r["name"], r) for r in result["runs"].values()] + others
    drawn = R.figures(result, base, {"method": ctx.records[primary]}, ctx.fig_dir / "rectify")
    made = {p.name: f"figures/rectify/{p.name}" for p in drawn}
    ctx.figures += list(made.values())
    # the headline already warns about n and discordance, and the noise run is listed as missing below
    ctx.caveats += [f"rectification ({primary}): {c}" for c in result["caveats"]
                    if c.startswith(("the method run logged no", "the base rerun diverged"))]  # fmt: skip
    for name, r in runs:
        if r["nondeterministic"]:
            ctx.caveats.append(f"rectification ({name}): {r['nondeterministic']} pair(s) diverged before any "
                               "steering event: nondeterminism, excluded from the rectification tables")  # fmt: skip
    ctx.summary["rectification"] = dict(
        available=True, method=primary, control=control, noise=noise is not None,
        runs={n: {k: v for k, v in r.items() if k != "pairs"} for n, r in runs},
        method_vs_control=result.get("method_vs_control"), caveats=result["caveats"], figures=list(made.values()),
    )  # fmt: skip
    blocks: list = [
        Para("Base and each steered run are paired by problem (token ids from `--log-tokens`). d = first token "
             "where the ids differ; pairs that diverge before their first steering event are nondeterminism and "
             "are excluded from every table below except the accuracy columns (`lrs.analysis.rectify`)."),
        Heading(3, "Outcome categories"),
        Table(["run", "n", "excluded", "fixed", "broken", "net", "both right: unchanged", "both right: diverged",
               "both wrong: unchanged", "both wrong: same answer", "both wrong: different"],
              _category_rows(runs), csv="rectify-categories.csv"),
        Heading(3, "Divergence"),
        Table(["run", "unchanged", "diverged", "length-only", "d < e₁ (excluded)", "median d", "median d/T",
               "median lag", "lag = 0", "events ≤ d", "margin at d"], _divergence_rows(runs),
              csv="rectify-divergence.csv"),
        Heading(3, "Answer change (diverged pairs) and base error type"),
        Table(["run", "category", *R.CHANGES], _by_category_rows(runs, "changes", R.CHANGES),
              csv="rectify-changes.csv"),
        Table(["run", "category", *R.ERROR_TYPES], _by_category_rows(runs, "error_types", R.ERROR_TYPES),
              csv="rectify-error-types.csv"),
    ]  # fmt: skip
    x = result["runs"]["method"]["rectification"]
    if result["runs"]["method"]["comparison"]["fixed"]:
        blocks.append(
            Para(
                f"Fixed by {primary}: corrected in place {x['corrected_in_place']} (base's wrong value appears "
                f"after the divergence and is revised), avoided {x['avoided']}, no base answer "
                f"{x['no_base_answer']}; the texts part before base's first false equation in {x['preemptive']} "
                f"of {x['arithmetic_fixed']} arithmetic fixes."
            )
        )
    flips = result["runs"]["method"]["flips"]
    if flips:
        rows = [[f["base"], f["method"], str(f["n"])] for f in flips]
        blocks += [Heading(3, f"Flip tokens ({primary}: base → steered at d)"),
                   Table(["base token", "steered token", "pairs"], rows[:10], csv="rectify-flips.csv",
                         csv_rows=rows, numeric=True)]  # fmt: skip
    if noise is None:
        ctx.missing.append(
            f"no noise floor: a base rerun with another batch size, `--out {ctx.eval_dir}/noise`"
        )
        blocks.append(Para("No noise-floor run: how often base diverges from itself without steering is unknown "
                           f"(a base rerun with `--log-tokens --batch-size 3 --out {ctx.eval_dir}/noise`).",
                           kind="missing"))  # fmt: skip
    if not has_events(ctx.results[ctx.base]):
        ctx.missing.append(
            "base has no per-token rewards: rerun base with `--shadow` for the reward fork plot"
        )
        blocks.append(Para("Base was run without `--shadow`, so it has no per-token reward: the fork plot needs "
                           "`lrs eval --method base --shadow`.", kind="missing"))  # fmt: skip
    figs = [
        Figure(made[n], cap)
        for n, cap in (("F3-divergence.png", "F3: divergence ECDF by category, noise floor dashed, first events"),
                       ("F4-raster.png", "F4: event raster, one row per diverged pair sorted by d"),
                       ("F5-fork.png", "F5: reward and top-1 probability around the divergence (steered solid, "
                                       "base shadow dashed); r before vs after each step"),
                       ("F7-lengths.png", "F7: base vs steered lengths with truncation rates"))
        if n in made
    ]  # fmt: skip
    if figs:
        blocks += [FigureRow(figs[:2]), *figs[2:]]
    for name, r in runs:
        blocks.append(Details(f"per-pair rows: {name} ({r['n']} problems)",
                              [Table(list(PAIR_FIELDS), [[num(v, ".4g") if isinstance(v, float) else
                                                          ("–" if v is None else str(v)) for v in _pair_row(p)]
                                                         for p in r["pairs"]],
                                     csv=f"rectify-pairs-{name.split()[0]}.csv",
                                     csv_rows=[_pair_row(p) for p in r["pairs"]], numeric=False)]))  # fmt: skip
    return blocks


def rectification_section(ctx: Context) -> list:
    """Section 2: rectification tables and figures when token ids were logged, else one line on how to log
    them (plus where steering fired, if events were logged); then the trace-diff cards."""
    blocks: list = [Heading(2, TITLES["rectification"], "rectification")]
    if ctx.base is None or ctx.primary is None:
        ctx.summary["rectification"] = dict(available=False, reason="needs base and a steered run")
        blocks.append(Para("Rectification pairs base with a steered run; this report has "
                           f"{'no base run' if ctx.base is None else 'no steered run'}.", kind="missing"))  # fmt: skip
        return blocks
    logged = [m for m in ctx.steered if has_tokens(ctx.results[m])]
    if has_tokens(ctx.results[ctx.base]) and logged:
        blocks += _rectify_blocks(ctx, logged)
    else:
        who = [m for m in [ctx.base, *ctx.steered] if not has_tokens(ctx.results[m])]
        line = (f"This run was made without --log-tokens ({', '.join(who)} carry no token ids), so the divergence "
                "point, lag, flip tokens, event raster and reward fork plot cannot be computed. These commands add "
                "them (same model and flags as the run), then rerun the report:")  # fmt: skip
        ctx.summary["rectification"] = dict(available=False, reason="made without --log-tokens", runs=who)
        ctx.missing.append(
            f"token logs ({', '.join(who)}): rerun `lrs eval` with `--log-tokens` (base: `--shadow`)"
        )
        blocks += [Para(line, kind="missing"), Pre(_commands(ctx))]
        prim = ctx.primary
        if has_events(ctx.results[prim]):
            fig = F.events_figure(ctx.records[ctx.base], ctx.records[prim], prim, ctx.fig("events.png"))
            if fig is not None:
                blocks.append(Figure(f"figures/{fig.name}", f"where {prim} steered (one row per problem, by "
                                     "outcome vs base) and its mean reward r_t along the traces"))  # fmt: skip
    return blocks + cards_blocks(ctx)


def cards_blocks(ctx: Context) -> list:
    """Trace-diff cards: three fixed and three broken problems of the primary steered run, seeded draw."""
    prim = ctx.primary
    base, method = ctx.records[ctx.base], ctx.records[prim]
    drawn = C.draw(base, method, seed=ctx.seed)
    blocks: list = [Heading(3, f"Trace-diff cards (base vs {prim})", "cards")]
    if not drawn:
        ctx.summary["cards"] = dict(method=prim, seed=ctx.seed, drawn=[])
        return blocks + [Para(f"{prim} neither fixed nor broke any problem: there is no card to draw.")]
    cards = [C.build(cat, pid, base[pid], method[pid], prim, ctx.decode) for cat, pid in drawn]
    ctx.summary["cards"] = dict(method=prim, seed=ctx.seed, drawn=[{k: v for k, v in c.items() if k != "html"}
                                                                   for c in cards])  # fmt: skip
    md = "\n".join(
        f"- {c['category']} `{c['id']}`: base {c['base_pred']} → {prim} {c['method_pred']} (gold {c['gold']}); "
        + (
            f"diverged at token {c['d']}"
            if c["d"] is not None
            else f"diverged at character {c['divergence_char']}"
        )
        + (f", {c['events']} steering events" if c["events"] is not None else "")
        for c in cards
    )
    note = (f"Drawn with `numpy.random.default_rng({ctx.seed})` among the problems {prim} fixed and broke "
            "(never hand-picked; `lrs report --seed` draws others).")  # fmt: skip
    md += "\n\nThe cards themselves (texts side by side, events and behaviour chips) are in report.html."
    return blocks + [Para(note, kind="note"), Raw(C.chip_legend() + "".join(c["html"] for c in cards), md)]


# ---- section 3: behaviours --------------------------------------------------------------------------------


def _validation_blocks(ctx: Context) -> list:
    try:
        rep = validate()
    except LRSError as e:
        ctx.missing.append(f"tagger validation: {e}")
        return [Para(f"Tagger validation not available: {e}", kind="missing")]
    rows, low = [], []

    def ci(x, c) -> str:
        return "–" if x is None else f"{x:.2f} [{c[0]:.2f}, {c[1]:.2f}]" if c else f"{x:.2f}"

    for s in rep.scores.values():
        flag = []
        if s.precision is not None and s.precision < PRECISION_FLOOR:
            flag.append(f"precision < {PRECISION_FLOOR}")
        if s.recall is not None and s.recall < RECALL_FLOOR:
            flag.append(f"recall < {RECALL_FLOOR}")
        if flag:
            low.append(f"{s.tag} ({', '.join(flag)})")
        rows.append([s.tag, str(s.n_pos), f"{s.tp} / {s.fp} / {s.fn}", ci(s.precision, s.precision_ci95),
                     ci(s.recall, s.recall_ci95), ci(s.f1, s.f1_ci95), ", ".join(flag) or "ok"])  # fmt: skip
    ctx.summary.setdefault("behaviours", {})["validation"] = rep.to_dict() | {"errors": len(rep.errors)}
    if low:
        ctx.caveats.append("tagger below its floors on the validation set: " + "; ".join(low))
    return [
        Heading(3, "Tagger validation"),
        Para(f"Lexicon v{rep.lexicon['version']} (sha256 `{rep.lexicon['sha256'][:16]}`) on the frozen "
             f"{rep.split} split of the hand-labelled set ({rep.n} sentences): Wilson CIs for precision and "
             f"recall, bootstrap CI for F1. Floors: precision ≥ {PRECISION_FLOOR}, recall ≥ {RECALL_FLOOR}."),
        Table(["tag", "positives", "TP / FP / FN", "precision [95% CI]", "recall [95% CI]", "F1 [95% CI]",
               "floors"], rows, csv="tagger-validation.csv"),
    ]  # fmt: skip


def _diff_rows(d: dict) -> list[list[str]]:
    n = max(1, d["n_pairs"])
    rows = []
    for tag, s in d["tags"].items():
        if s["n"] == 0:
            rows.append([tag, *["–"] * 8])
            continue
        lo, hi = s["mean_diff_ci95"]
        rows.append([tag, f"{s['base_instances'] / n:.2f}", f"{s['method_instances'] / n:.2f}",
                     num(s["base_mean"], ".2f"), num(s["method_mean"], ".2f"),
                     f"{s['mean_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]",
                     f"{pct(s['base_present'] / n, 0)} → {pct(s['method_present'] / n, 0)}",
                     f"{s['wilcoxon_p']:.3g} ({s['wilcoxon_p_holm']:.3g})",
                     f"{s['mcnemar_p']:.3g} ({s['mcnemar_p_holm']:.3g})"])  # fmt: skip
    return rows


def behaviours_section(ctx: Context) -> list:
    """Section 3: tagger validation, then per method the paired behaviour table against base and a figure."""
    blocks: list = [Heading(2, TITLES["behaviours"], "behaviours"), *_validation_blocks(ctx)]
    summ = ctx.summary.setdefault("behaviours", {})
    if ctx.base is None:
        return blocks + [Para("Paired behaviour statistics need a base run.", kind="missing")]
    try:
        base = keyed_traces(ctx.results[ctx.base]["records"], "base", ctx.base)
    except LRSError as e:
        return blocks + [Para(f"Behaviour statistics not computed: {e}", kind="missing")]
    diffs: dict[str, dict] = {}
    blocks += [Heading(3, "Behaviour rates, paired per problem"), Para(
        "Per tag: instances per trace, mean instances per 1k generated tokens (steering changes length, so "
        "rates are per 1k tokens), Δ = method − base with a paired bootstrap 95% CI, the share of traces with "
        "≥ 1 tagged sentence, Wilcoxon signed-rank p on the rates and exact McNemar p on presence, each with "
        "its Holm-adjusted value across the six tags (`lrs.analysis.behaviour_stats`). Associations with "
        "steering, not causes; read them with the rectification tables.", kind="note")]  # fmt: skip
    for m in [m for m in ctx.results if m != ctx.base]:
        try:
            diffs[m] = behaviour_diff(base, keyed_traces(ctx.results[m]["records"], m, m), n_boot=ctx.n_boot,
                                      seed=ctx.seed)  # fmt: skip
        except LRSError as e:
            blocks.append(Para(f"{m}: not compared ({e})", kind="missing"))
            continue
        blocks.append(
            Table(
                [
                    "tag",
                    "base /trace",
                    f"{m} /trace",
                    "base /1k",
                    f"{m} /1k",
                    "Δ /1k [95% CI]",
                    "traces ≥1 b→m",
                    "Wilcoxon p (Holm)",
                    "McNemar p (Holm)",
                ],
                _diff_rows(diffs[m]),
                csv=f"behaviours-{m}.csv",
                caption=f"{m} vs base ({diffs[m]['n_pairs']} problems)",
            )
        )
    summ["paired"] = {m: {k: v for k, v in d.items() if k != "problems"} for m, d in diffs.items()}
    if diffs:
        fig = F.behaviours(diffs, TAGS, ctx.fig("behaviours.png"))
        if fig is not None:
            blocks.append(Figure(f"figures/{fig.name}", "Δ behaviour instances per 1k tokens vs base (95% CI)",
                                 width="760px"))  # fmt: skip
        first = next(iter(diffs.values()))
        n = max(1, first["n_pairs"])
        floor = [t for t in TAGS if first["tags"][t]["base_present"] / n < BASE_RATE_MIN]
        if floor:
            ctx.caveats.append(
                f"behaviour base rates below {BASE_RATE_MIN:.0%} of base traces for {', '.join(floor)}: a change "
                "is only detectable if steering creates the markers (McNemar needs about 8 → 1 discordant traces)"
            )
    return blocks


# ---- section 4: latents -----------------------------------------------------------------------------------


def find_latents(ctx: Context) -> Path | None:
    """The ``latents.md`` to include: ``--latents`` (a file or its folder), else ``<run>/latents/latents.md``."""
    if ctx.latents is not None:
        p = Path(ctx.latents)
        p = p / "latents.md" if p.is_dir() else p
        if not p.is_file():
            raise LRSError(
                f"--latents {ctx.latents}: no latents.md there (write one with `lrs analyze latents`)"
            )
        return p
    root = run_root(ctx.eval_dir)
    p = root / "latents" / "latents.md" if root is not None else None
    return p if p is not None and p.is_file() else None


def latents_section(ctx: Context) -> list:
    """Section 4: ``latents.md`` from ``lrs analyze latents`` when given or found, else how to make it."""
    blocks: list = [Heading(2, TITLES["latents"], "latents")]
    path = find_latents(ctx)
    if path is None:
        root = run_root(ctx.eval_dir) or Path("RUN")
        ev = ctx.eval_dir / f"{ctx.primary or 'lrs'}.jsonl"
        cmd = (f"lrs analyze latents --traces {root}/traces --encoder {root}/encoder.safetensors "
               f"--reward {root}/reward.safetensors --events {ev} --model MODEL --out {root}/latents")  # fmt: skip
        ctx.summary["latents"] = dict(included=None)
        ctx.missing.append(f"latent tables: `{cmd}`, then rerun the report (or pass `--latents PATH`)")
        return blocks + [
            Para("No latents.md was given or found, so there are no latent tables. This command makes them (its "
                 "`--events` must be a latent method's run with `--log-tokens`); then rerun the report:",
                 kind="missing"),
            Pre(cmd),
        ]  # fmt: skip
    ctx.summary["latents"] = dict(included=str(path))
    return blocks + [
        Para(f"Included from `{path}` (written by `lrs analyze latents`).", kind="note"),
        Included(path.read_text(encoding="utf-8"), path.parent, demote=1),
    ]
