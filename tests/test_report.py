"""Report: headline numbers equal hand-computed ones, the HTML is one self-contained file with every section and
its figures, the seeded trace cards are reproducible, and a run without logs still gives a whole report.

The synthetic run (``make_run``) plants known outcomes: 30 problems; LRS fixes 6 and breaks 2; the random
control fixes 2 and breaks 3; base and steered runs carry token ids, token strings, top-2 probabilities and
per-token events (base as a shadow run), and one random pair diverges before its first steering event.
"""

import json
import re

import numpy as np
import pytest
from scipy.stats import binomtest

from lrs.cli import main
from lrs.errors import LRSError
from lrs.evaluate import write_result
from lrs.report import SECTIONS, write_report
from lrs.stats import proportion_ci

N = 30
# outcomes per problem: (base, lrs, random) right?
OUTCOMES = (
    [(0, 1, 1)] * 2  # fixed by both
    + [(0, 1, 0)] * 4  # fixed by lrs only
    + [(1, 0, 1)] * 2  # broken by lrs
    + [(1, 1, 0)] * 3  # broken by random
    + [(1, 1, 1)] * 9
    + [(0, 0, 0)] * 10
)
CHANGED = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20, 21}  # pairs whose steered text differs from base


class Vocab:
    """Token strings ↔ ids for the synthetic traces."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def encode(self, text: str) -> tuple[list[int], list[str]]:
        strs = re.findall(r"\s*\S+|\s+", text)
        return [self.ids.setdefault(s, len(self.ids)) for s in strs], strs


def _texts(i: int, a: int, b: int, right: bool, steered: bool) -> str:
    """One trace: a plan sentence, then (base style) a sum or (steered style) a verified sum, then the answer."""
    total = a + b if right else a + b + 1
    plan = (
        f"First, we need to find the total number of apples in problem {i}."
        + (i % 4) * (f" The farmer starts with {a} apples and then buys {b} more.")
        + "\n\n"
    )
    if not steered:
        body = f"Adding them gives {a} + {b} = {total}.\n\nSo the answer is \\boxed{{{total}}}."
    else:
        body = (
            f"Let's verify each step carefully. We compute {a} + {b} = {total}. That checks out.\n\n"
            f"So the answer is \\boxed{{{total}}}."
        )
    return plan + body


def _record(i, vocab, a, b, right, steered, events_at, rng, shadow=False):
    text = _texts(i, a, b, right, steered)
    ids, strs = vocab.encode(text)
    events = []
    for t in range(len(ids)):
        e = dict(
            t=t, r=round(float(rng.uniform(0.2, 0.8)), 4), c=None if t == 0 else 0.6, steered=False, dh=0.0
        )
        if not shadow and t in events_at:
            e.update(steered=True, dh=0.3, r_post=min(1.0, e["r"] + 0.2), gate="reward", dh_rel=0.05,
                     z_pre=[0.1, -0.2, 0.3, 0.0], z_post=[0.2, -0.1, 0.2, 0.1])  # fmt: skip
        events.append(e)
    p1 = [round(float(x), 4) for x in rng.uniform(0.5, 0.9, len(ids))]
    return dict(
        id=f"toy/test/{i}",
        prompt=f"<|im_start|>user\nA farmer has {a} apples and buys {b} more. How many?<|im_end|>\n",
        output=text,
        pred=str(a + b if right else a + b + 1),
        gold=str(a + b),
        correct=bool(right),
        tokens=len(ids),
        truncated=False,
        check="numeric",
        token_ids=ids,
        token_strs=strs,
        finish_reason="eos",
        p_top1=p1,
        p_top2=[round(x / 3, 4) for x in p1],
        events=events,
        steer_steps=len(ids),
        steers=0 if shadow else len(events_at),
    )


def _summary(method, recs, steered):
    n = len(recs)
    k = sum(r["correct"] for r in recs)
    s = dict(
        method=method, name=method, n=n, accuracy=k / n, ci95=list(proportion_ci(k, n)), mean_tokens=np.mean(
            [r["tokens"] for r in recs]), truncated=0, wall_time_s=12.0, model="toy-model", dtype="float32",
        max_new_tokens=128, batch_size=8, seed=0, task="toy", split="test", split_seed=0, device="cpu",
        cache_key=f"key-{method}", versions={"lrs": "0.1.0"}, git="abc123",
    )  # fmt: skip
    if steered:
        cfg = dict(k=2, alpha=0.3, tau_r=0.9, tau_c=0.72, gate="gated", warmup=4, every=4, tau_r_quantile=None,
                   control="random" if method == "random" else "reward")  # fmt: skip
        s["key_parts"] = dict(steerer=dict(kind="latent", config=cfg, encoder="e" * 64, reward="f" * 64))
        steers = sum(r["steers"] for r in recs)
        s["steering"] = dict(steer_rate=steers / sum(r["tokens"] for r in recs), steered_tokens=steers)
    s["logging"] = {"tokens": True, "events": True}
    return s


def make_run(root, logs=True):
    """Write the synthetic base / lrs / random results under ``root/eval/toy/test``; returns the eval dir."""
    out = root / "eval" / "toy" / "test"
    vocab = Vocab()
    rng = np.random.default_rng(1)
    runs = {"base": [], "lrs": [], "random": []}
    for i, (ob, ol, orr) in enumerate(OUTCOMES):
        a, b = 10 + i, 3 + i % 7
        base = _record(i, vocab, a, b, ob, False, (), rng, shadow=True)
        for name, ok in (("lrs", ol), ("random", orr)):
            changed = i in CHANGED or ok != ob
            ids, _ = vocab.encode(_texts(i, a, b, ok, changed))
            d = next(
                (j for j, (x, y) in enumerate(zip(ids, base["token_ids"], strict=False)) if x != y), len(ids)
            )
            first = d + 3 if (name == "random" and i == 0) else d - 2  # random pair 0: nondeterministic
            ev = {first, d + 6, d + 10}
            if name == "lrs" and i % 2 == 0:
                ev.add(d)  # lag 0 for half the lrs pairs
            runs[name].append(_record(i, vocab, a, b, ok, changed, ev, rng))
        runs["base"].append(base)
    for name, recs in runs.items():
        if not logs:
            for r in recs:
                for k in ("token_ids", "token_strs", "finish_reason", "p_top1", "p_top2", "events"):
                    r.pop(k)
        write_result({"summary": _summary(name, recs, name != "base"), "records": recs}, out, name)
    return out


def _hand(base, other):
    fixed = sum(1 for b, m in zip(base, other, strict=True) if m and not b)
    broken = sum(1 for b, m in zip(base, other, strict=True) if b and not m)
    return fixed, broken, binomtest(fixed, fixed + broken, 0.5).pvalue


@pytest.fixture()
def logged_report(tmp_path):
    eval_dir = make_run(tmp_path / "run")
    out = tmp_path / "rep"
    write_report(eval_dir, out, n_boot=500)
    return eval_dir, out


def test_headline_numbers_equal_hand_computed_ones(logged_report):
    _, out = logged_report
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["headline"]}
    base = [o[0] for o in OUTCOMES]
    for col, name in ((1, "lrs"), (2, "random")):
        other = [o[col] for o in OUTCOMES]
        fixed, broken, p = _hand(base, other)
        r = rows[name]
        assert (r["fixed"], r["broken"]) == (fixed, broken)
        assert r["mcnemar_p"] == pytest.approx(p)
        assert r["acc"] == pytest.approx(sum(other) / N)
        assert r["delta"] == pytest.approx((sum(other) - sum(base)) / N)
    assert (rows["lrs"]["fixed"], rows["lrs"]["broken"]) == (6, 2)
    assert rows["base"]["ci95"] == pytest.approx(list(proportion_ci(sum(base), N)))
    vc = summary["method_vs_control"]
    assert (vc["method_only_right"], vc["control_only_right"]) == (7, 2)
    assert vc["mcnemar_p"] == pytest.approx(binomtest(7, 9, 0.5).pvalue)
    assert rows["lrs"]["mde"] > 0  # minimum detectable effect at the observed discordance
    md = (out / "report.md").read_text()
    p = binomtest(6, 8, 0.5).pvalue
    assert f"| lrs | {N} | {sum(o[1] for o in OUTCOMES) / N:.1%} [" in md and f"| 6 | 2 | {p:.3g} |" in md
    csv = (out / "tables" / "headline.csv").read_text().splitlines()
    assert csv[0].startswith("method,n,correct,accuracy") and len(csv) == 4


def test_html_is_self_contained_with_every_section_and_figure(logged_report):
    _, out = logged_report
    html = (out / "report.html").read_text()
    assert 'src="http' not in html and "<script" not in html.lower() and "<link" not in html.lower()
    for anchor, title in SECTIONS:
        assert f'id="{anchor}">{title}</h2>' in html
    assert html.count('src="data:image/png;base64,') >= 6  # accuracy, forest, flips, F3/F4/F5/F7, behaviours
    for fig in ("accuracy.png", "F1-flips.png", "F2-forest.png", "behaviours.png", "rectify/F4-raster.png",
                "rectify/F5-fork.png"):  # fmt: skip
        assert (out / "figures" / fig).stat().st_size > 1000
    assert "made without --log-tokens" not in html
    summary = json.loads((out / "summary.json").read_text())
    rect = summary["rectification"]
    assert rect["available"] and rect["method"] == "lrs" and rect["control"] == "random"
    assert rect["runs"]["random"]["nondeterministic"] == 1  # the planted pair that diverged before its events
    assert any("nondeterminism" in c or "before any steering event" in c for c in summary["caveats"])
    assert any("n = 30" in c for c in summary["caveats"])
    assert "Tagger validation" in html and "verification" in html
    for name in (
        "rectify-categories.csv",
        "behaviours-lrs.csv",
        "tagger-validation.csv",
        "rectify-pairs-lrs.csv",
    ):
        assert (out / "tables" / name).exists()
    assert "lrs analyze latents" in html  # no latents.md: the line saying how to make it
    assert (out / "accuracy.png").exists()  # kept where earlier reports wrote it


def test_trace_cards_are_a_seeded_draw_and_the_same_on_two_runs(tmp_path, logged_report):
    eval_dir, out = logged_report
    again = tmp_path / "again"
    write_report(eval_dir, again, n_boot=500)
    cards = json.loads((out / "summary.json").read_text())["cards"]
    assert cards == json.loads((again / "summary.json").read_text())["cards"]
    drawn = [(c["category"], c["id"]) for c in cards["drawn"]]
    fixed = {f"toy/test/{i}" for i, o in enumerate(OUTCOMES) if o[1] and not o[0]}
    broken = {f"toy/test/{i}" for i, o in enumerate(OUTCOMES) if o[0] and not o[1]}
    assert [c for c, _ in drawn] == ["fixed"] * 3 + ["broken"] * 2  # only 2 broken problems exist
    assert {i for c, i in drawn if c == "fixed"} <= fixed and {i for c, i in drawn if c == "broken"} == broken
    html = (out / "report.html").read_text()
    cut = lambda h: h[h.index('id="cards"') : h.index('id="behaviours"')]  # noqa: E731
    assert cut(html) == cut((again / "report.html").read_text())
    assert html.count('<article class="card">') == 5
    assert 'class="chip"' in cut(html) and 'class="ev"' in cut(html) and "div" in cut(html)
    other = tmp_path / "other-seed"
    (
        eval_dir / "noise"
    ).mkdir()  # a base rerun found where `lrs analyze rectify` docs put it: the noise floor
    (eval_dir / "noise" / "base.jsonl").write_text((eval_dir / "base.jsonl").read_text())
    write_report(eval_dir, other, seed=7, n_boot=500)
    summary = json.loads((other / "summary.json").read_text())
    assert summary["cards"]["seed"] == 7
    assert (
        summary["rectification"]["noise"] and summary["rectification"]["runs"]["noise (base rerun)"]["n"] == N
    )
    assert not any("noise" in m for m in summary["missing"])


def test_run_without_logs_says_how_to_log_and_still_reports(tmp_path):
    eval_dir = make_run(tmp_path / "run", logs=False)
    for name in ("random",):
        for suffix in (".jsonl", ".summary.json"):
            (eval_dir / f"{name}{suffix}").unlink()
    out = tmp_path / "rep"
    md = write_report(eval_dir, out, n_boot=200).read_text()
    html = (out / "report.html").read_text()
    assert "made without --log-tokens" in html and "made without --log-tokens" in md
    assert "--shadow" in html
    for anchor, title in SECTIONS:
        assert f'id="{anchor}">{title}</h2>' in html
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rectification"]["available"] is False
    assert any("random" in m for m in summary["missing"])  # no matched control: said, with the command
    assert summary["cards"]["drawn"]  # cards need only the texts
    assert "| lrs | 30 |" in md and "±" in md


def test_latents_md_is_included_with_its_figures(tmp_path):
    eval_dir = make_run(tmp_path / "run")
    lat = tmp_path / "run" / "latents"
    (lat / "figures").mkdir(parents=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 1))
    fig.add_subplot(1, 1, 1).plot([0, 1])
    fig.savefig(lat / "figures" / "events.png", dpi=50)
    (lat / "latents.md").write_text(
        "## Latents\n\nEncoder topk.\n\n| unit | mean |\n|---|---|\n| z0 | 0.1 |\n\n"
        "<details><summary>z0: top contexts</summary>\n\n- high +1 `a<b`\n\n</details>\n\n"
        "![events](figures/events.png)\n"
    )
    out = tmp_path / "rep"
    md = write_report(eval_dir, out, methods="base,lrs", n_boot=200).read_text()
    html = (out / "report.html").read_text()
    assert (
        "<h3>Latents</h3>" in html and "<td>z0</td>" in html and "<details><summary>z0: top contexts" in html
    )
    assert "a&lt;b" in html and html.count("data:image/png;base64,") >= 4
    assert "](../run/latents/figures/events.png)" in md  # Markdown links resolve from the report folder
    assert "random" not in json.loads((out / "summary.json").read_text())["methods"]


def test_cli_report_flags(tmp_path, capsys):
    make_run(tmp_path / "run")
    argv = ["report", "--run", str(tmp_path / "run"), "--task", "toy", "--split", "test"]
    assert main([*argv, "--methods", "base,lrs,random,diffmean", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "report.md" in printed and "report.html" in printed
    assert (tmp_path / "r" / "report.html").exists()
    assert main([*argv, "--methods", "base,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(argv) == 0 and (tmp_path / "run" / "report.html").exists()  # default: the run directory
    # results written with `lrs eval --out DIR` elsewhere: --results points at them
    import shutil

    shutil.move(tmp_path / "run" / "eval" / "toy" / "test", tmp_path / "elsewhere")
    assert main(["report", "--results", str(tmp_path / "elsewhere"), "--out", str(tmp_path / "r2")]) == 0
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert {r["method"] for r in summary["headline"]} == {"base", "lrs", "random"}
    assert main(["report", "--results", str(tmp_path / "nowhere")]) == 2
    assert "not a folder of eval results" in capsys.readouterr().err


def test_report_without_results_is_a_clear_error(tmp_path):
    with pytest.raises(LRSError, match="no results"):
        write_report(tmp_path / "eval" / "test")


def test_layer_comes_from_any_sidecar_in_the_run_with_the_hash_the_run_used(tmp_path):
    eval_dir = make_run(tmp_path / "run", logs=False)
    side = dict(format="lrs.encoder/1", hash="e" * 64, config=dict(kind="identity", layer=7))
    (tmp_path / "run" / "enc-id.json").write_text(json.dumps(side))  # an eval made with --encoder enc-id...
    (tmp_path / "run" / "enc-other.json").write_text(
        json.dumps(side | dict(hash="0" * 64, config={"layer": 3}))
    )
    md = write_report(eval_dir, tmp_path / "rep", n_boot=50).read_text()
    assert "layer: `7`" in md


def test_a_quantile_gated_run_reports_the_tau_r_its_gate_used(tmp_path):
    """The cache key keeps the default tau_r; the report must show the quantile's value from the steering stats."""
    from lrs.report.data import run_config

    recs = [dict(id=f"p{i}", correct=bool(i % 2), tokens=10) for i in range(4)]
    s = _summary("lrs", [dict(r, steers=2) for r in recs], steered=True)
    s["key_parts"]["steerer"]["config"]["tau_r_quantile"] = 0.3
    s["steering"]["config"] = dict(s["key_parts"]["steerer"]["config"], tau_r=0.4213)
    cfg = run_config({"lrs": {"summary": s, "records": recs}}, tmp_path)
    assert cfg["tau_r"] == 0.4213 and cfg["tau_r_quantile"] == 0.3
    assert cfg["methods"][0]["tau_r"] == 0.4213
    del s["steering"]["config"]  # a summary written before the stats held the used value
    assert run_config({"lrs": {"summary": s, "records": recs}}, tmp_path)["tau_r"] == 0.9


def test_trained_vectors_are_paired_with_their_norm_matched_control_and_boxed_is_counted(tmp_path):
    """A base / vectors / vectors-random run: the report follows ``vectors`` (not its control), compares it with
    ``vectors-random`` like LRS with ``random``, and the % boxed column equals a hand count."""
    from lrs.evaluate import load_result

    src = make_run(tmp_path / "run", logs=False)
    out = tmp_path / "vec" / "eval" / "toy" / "test"
    unboxed = {0, 3, 7}  # base outputs without a final \boxed{} answer
    for old, new in (("base", "base"), ("lrs", "vectors"), ("random", "vectors-random")):
        res = load_result(src, old)
        if old == "base":
            for i in unboxed:
                res["records"][i]["output"] = res["records"][i]["output"].replace("\\boxed", "")
        res["summary"].update(method=new, name=new)
        write_result(res, out, new)
    write_report(out, tmp_path / "rep", n_boot=200)
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    vc = summary["method_vs_control"]
    assert (vc["method"], vc["control"]) == ("vectors", "vectors-random")
    assert (vc["method_only_right"], vc["control_only_right"]) == (7, 2)  # lrs/random's planted outcomes
    rows = {r["method"]: r for r in summary["headline"]}
    assert rows["base"]["boxed"] == pytest.approx((N - len(unboxed)) / N) and rows["vectors"]["boxed"] == 1.0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "**vectors vs its matched random control `vectors-random`**" in md
    assert "trained per-layer norms" in md and "% boxed" in md
    assert "no matched random control" not in md


def test_cli_power_from_a_pilot_pair_and_from_a_rate(tmp_path, capsys):
    """`lrs power`: a pilot's discordance (lrs vs base: 6 fixed + 2 broken of 30), the MDE at n and the n an
    effect needs; bad input is one line and exit 2."""
    from lrs.stats import mcnemar_mde, mcnemar_n_needed

    d = make_run(tmp_path / "run", logs=False)
    assert main(["power", "--pilot", str(d / "base.jsonl"), str(d / "lrs.jsonl"), "--n", "300",
                 "--effect", "0.1"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    rate = 8 / N
    assert "6 fixed / 2 broken" in out and f"discordance {rate:.1%}" in out
    assert f"net change of {100 * mcnemar_mde(300, rate):.1f} points" in out
    assert f"needs n = {mcnemar_n_needed(0.1, rate)} problems" in out
    assert main(["power", "--n", "1200", "--discordance", "0.1"]) == 0
    assert f"{100 * mcnemar_mde(1200, 0.1):.1f} points" in capsys.readouterr().out
    for argv, msg in ((["--n", "300"], "exactly one of --discordance and --pilot"),
                      (["--discordance", "0.1"], "give --n"),
                      (["--pilot", str(d / "base.jsonl"), str(d / "nope.jsonl"), "--n", "3"], "no eval result")):  # fmt: skip
        assert main(["power", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
