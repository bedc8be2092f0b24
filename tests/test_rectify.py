"""Error rectification: divergence, lag, categories on hand-built pairs; the safe arithmetic checker; the CLI;
and the pre-divergence invariant (steered vs shadow base) on a tiny model."""

import builtins
import json

import pytest
import torch
from scipy.stats import binomtest

from lrs.analysis.rectify import (
    analyse_pair,
    compare_runs,
    divergence,
    equations,
    error_type,
    first_false_equation,
    lag_of,
    method_vs_control,
    safe_arith,
)
from lrs.errors import LRSError


def rec(pid, ids, correct, pred="7", *, steered=None, output=None, p1=None, p2=None, finish="eos", gold="7"):
    """A logged eval record; ``steered`` lists the token indices the run steered (None: no events logged)."""
    r = dict(
        id=pid,
        token_ids=list(ids),
        correct=correct,
        pred=pred,
        gold=gold,
        output=output if output is not None else " ".join(map(str, ids)),
        finish_reason=finish,
        truncated=finish == "length",
        tokens=len(ids),
    )
    if steered is not None:
        r["events"] = [dict(t=t, r=0.5, steered=t in steered) for t in range(len(ids))]
    if p1 is not None:
        r["p_top1"], r["p_top2"] = p1, p2
    return r


def test_divergence_and_lag_definitions():
    assert divergence([1, 2, 3], [1, 2, 3]) == (None, False)
    assert divergence([1, 2, 3], [1, 5, 3]) == (1, False)
    assert divergence([1, 2, 3, 4], [1, 2]) == (2, True)  # a prefix: the shorter length, flagged
    assert lag_of(5, [2, 5, 9]) == (0, 2)  # the steered token itself flipped
    assert lag_of(7, [2, 5, 9]) == (2, 2)  # flipped two tokens after the last event, through the KV cache
    assert lag_of(None, [2]) == (None, None) and lag_of(1, [2]) == (None, 0)


BASE = {
    "same": rec("same", [1, 2, 3, 4], True),
    "fix": rec("fix", [1, 2, 3, 4, 5, 6], False, "9", p1=[0.9] * 6, p2=[0.05, 0.05, 0.05, 0.40, 0.05, 0.05]),
    "brk": rec("brk", [1, 2, 3, 4, 5, 6], True, p1=[0.9] * 6, p2=[0.05, 0.05, 0.05, 0.05, 0.85, 0.05]),
    "noise": rec("noise", [1, 2, 3, 4], True),
    "wrong_same": rec("wrong_same", [1, 2, 3, 4, 5, 6], False, "8"),
    "wrong_diff": rec("wrong_diff", [1, 2, 3, 4, 5, 6], False, "8"),
    "wrong_pre": rec("wrong_pre", [1, 2, 3, 4, 5, 6], False, None, finish="length"),
}
METHOD = {
    "same": rec("same", [1, 2, 3, 4], True, steered=[2]),
    "fix": rec("fix", [1, 2, 3, 9, 9, 9], True, steered=[1, 3]),  # d = 3 at an event: lag 0
    "brk": rec("brk", [1, 2, 3, 4, 7, 7], False, "5", steered=[2]),  # d = 4, two tokens after the event
    "noise": rec("noise", [1, 8, 3, 4], True, steered=[3]),  # diverged before the first event
    "wrong_same": rec("wrong_same", [1, 2, 3, 4, 5, 5], False, "8", steered=[5]),
    "wrong_diff": rec("wrong_diff", [1, 2, 3, 4, 5, 6, 6], False, "6", steered=[4]),  # longer: length only
    "wrong_pre": rec("wrong_pre", [1, 2, 3, 3, 3], False, None, steered=[3], finish="length"),
}


def test_pairs_get_divergence_lag_margin_flip_and_category():
    rows = {p: analyse_pair(BASE[p], METHOD[p]) for p in BASE}
    assert (rows["same"]["d"], rows["same"]["category"], rows["same"]["subcategory"]) == (
        None,
        "both_right",
        "unchanged",
    )
    fix = rows["fix"]
    assert (fix["d"], fix["e1"], fix["lag"], fix["events_to_d"], fix["category"]) == (3, 1, 0, 2, "fixed")
    assert (
        fix["margin"] == pytest.approx(0.5)
        and fix["flip"] == ["#4", "#9"]
        and fix["change"] == "answer_changed"
    )
    brk = rows["brk"]
    assert (brk["d"], brk["lag"], brk["events_to_d"], brk["category"], brk["margin"]) == (
        4,
        2,
        1,
        "broken",
        0.05,
    )
    assert rows["noise"]["nondeterministic"] and rows["noise"]["d"] == 1
    assert rows["wrong_same"]["subcategory"] == "same_answer"
    assert rows["wrong_diff"]["subcategory"] == "different_answer" and rows["wrong_diff"]["length_only"]
    assert rows["wrong_diff"]["flip"] is None and rows["wrong_diff"]["d"] == 6
    assert (
        rows["wrong_pre"]["change"] == "neither_answered" and rows["wrong_pre"]["error_type"] == "truncation"
    )
    assert not any(r["nondeterministic"] for p, r in rows.items() if p != "noise")


def test_run_summary_counts_excludes_nondeterministic_pairs_and_keeps_accuracy_on_all():
    s = compare_runs(BASE, METHOD)
    assert s["n"] == 7 and s["nondeterministic"] == 1 and s["events_logged"]
    cats = s["categories"]
    assert cats["fixed"] == {"diverged": 1} and cats["broken"] == {"diverged": 1}
    assert cats["both_right"] == {"unchanged": 1}  # the nondeterministic pair is not counted
    # wrong_pre: neither gave an answer, which counts as the same (lack of) answer
    assert cats["both_wrong"] == {"same_answer": 2, "different_answer": 1}
    assert (s["comparison"]["fixed"], s["comparison"]["broken"], s["net_fixes"]) == (1, 1, 0)
    v = s["divergence"]
    assert (v["n"], v["unchanged"], v["diverged"], v["length_only"]) == (6, 1, 5, 1)
    assert (v["lag0"], v["with_lag"]) == (
        3,
        5,
    )  # fix (3-3), wrong_same (5-5), wrong_pre (3-3); brk 2, wrong_diff 2
    assert s["flips"][0]["n"] == 1 and len(s["flips"]) == 4  # 5 diverged, one of them length-only
    # without events nothing can be called nondeterministic, and nothing is excluded
    plain = {k: {kk: vv for kk, vv in r.items() if kk != "events"} for k, r in METHOD.items()}
    s2 = compare_runs(BASE, plain)
    assert s2["nondeterministic"] is None and not s2["events_logged"] and s2["divergence"]["n"] == 7
    with pytest.raises(LRSError, match="different problems"):
        compare_runs(BASE, {k: METHOD[k] for k in list(METHOD)[:3]})


def test_answer_change_corrected_in_place_avoided_and_error_types():
    base = rec(
        "a", [1, 2, 3], False, "12", output="We have 3 + 4 = 8 apples, then 8 + 4 = 12. The answer is 12."
    )
    in_place = rec(
        "a", [1, 2, 5], True, "11", output="We have 3 + 4 = 8... so 12? No: 7 + 4 = 11. The answer is 11."
    )
    avoided = rec(
        "a", [1, 2, 5], True, "11", output="We have 3 + 4 = 7 apples, then 7 + 4 = 11. The answer is 11."
    )
    r1, r2 = analyse_pair(base, in_place), analyse_pair(base, avoided)
    assert r1["error_type"] == r2["error_type"] == "arithmetic"
    assert r1["false_equation"]["lhs"] == "3 + 4" and r1["false_equation"]["rhs_value"] == 8
    assert r1["corrected_in_place"] is True and r2["corrected_in_place"] is False
    # the texts part at character 16 ("8" vs "7"), after base's false equation began (character 8)
    assert r2["divergence_char"] == 16 and r1["false_equation"]["start"] == 8 and r2["preemptive"] is False
    early = rec(
        "a", [1, 2, 5], True, "11", output="We know 3 + 4 = 7 apples, then 7 + 4 = 11. The answer is 11."
    )
    assert analyse_pair(base, early)["preemptive"] is True  # parted before the false equation began
    trunc = rec("t", [1, 2], False, None, output="Let me compute 3 + 4 = 7 and", finish="length")
    assert error_type(trunc)[0] == "truncation"
    extraction = rec("e", [1], False, None, output="So the total is 7 apples")
    assert error_type(extraction)[0] == "extraction"
    setup = rec("s", [1], False, "9", output="3 + 6 = 9. The answer is 9.")
    assert error_type(setup)[0] == "setup"
    finished = analyse_pair(
        rec("f", [1, 2], False, None, finish="length"), rec("f", [1, 3], True, "7", steered=[1])
    )
    assert finished["change"] == "finished" and finished["corrected_in_place"] is None
    only_format = analyse_pair(extraction | {"token_ids": [1, 2]}, rec("e", [1, 3], True, steered=[1]))
    assert only_format["change"] == "extraction_only"


@pytest.mark.parametrize(
    "text, found",
    [
        ("So 3 + 4 = 8 apples.", [("3 + 4", False)]),
        ("Step 1: 2 + 3 = 5\n1. 5 * 4 = 20", [("2 + 3", True), ("5 * 4", True)]),
        ("She pays $3 \\times 4 = \\$12 and 1,200 + 300 = 1,500.", [("3 * 4", True), ("1200 + 300", True)]),
        ("20 + 5 = 25 - 3 = 22", [("20 + 5", True), ("25 - 3", True)]),  # a running chain is not an error
        ("a = 2*3 + 4 = 10", [("2*3 + 4", True)]),
        (
            "\\frac{10}{4} = 2.5, 2/3 = 0.67, 2/3 = 0.66, 10/3 = 3",
            [("((10)/(4))", True), ("2/3", True), ("2/3", True), ("10/3", False)],
        ),
        ("x + 3 = 5 so x = 2, and 2^3 = 8, 50% of 20 = 10", []),  # variables, powers, percents: not checked
        ("3 x 4 = 12, 4 x 5 = 21", [("3*4", True), ("4*5", False)]),
        ("6 ÷ 2 = 3, 6 − 2 = 5, 7 - 10 = -3", [("6 / 2", True), ("6 - 2", False), ("7 - 10", True)]),
        ("$$ 12 \\cdot 3 = 36 $$ and (5 + 3 = 8)", [("12 * 3", True), ("5 + 3", True)]),
        ("100 / 0 = 5 and 1 == 1 and 2 <= 3", []),
    ],
)
def test_equation_checker_on_hand_checked_text(text, found):
    assert [(e.lhs, e.true) for e in equations(text)] == found


def test_first_false_equation_points_at_its_start():
    text = "First 2 + 2 = 4, then 10 * 3 = 33, then 1 + 1 = 3."
    eq = first_false_equation(text)
    assert text[eq.start :].startswith("10 * 3") and eq.lhs_value == 30 and eq.rhs_value == 33


def test_the_safe_evaluator_never_executes_anything_but_arithmetic(tmp_path, monkeypatch):
    import ast

    real_compile = builtins.compile

    def parse_only(source, filename, mode, flags=0, *a, **k):  # ast.parse compiles to a tree, never to code
        assert flags & ast.PyCF_ONLY_AST, "only parsing to an AST is allowed"
        return real_compile(source, filename, mode, flags, *a, **k)

    def forbidden(*a, **k):
        raise AssertionError("eval/exec must never be called")

    monkeypatch.setattr(builtins, "compile", parse_only)
    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    opened, touched = tmp_path / "opened", tmp_path / "touched"
    hostile = [
        f"open('{opened}', 'w')",
        f"__import__('os').system('touch {touched}')",
        "().__class__.__bases__[0].__subclasses__()",
        "2 ** 10 ** 10",
        "[1] * 10",
        "'a' * 3",
        "1 if True else 2",
        "(lambda: 1)()",
        "x + 1",
        "True + 1",
        "1 < 2",
        "9" * 5000,
        "(" * 200 + "1" + ")" * 200,
    ]
    assert [safe_arith(h) for h in hostile] == [None] * len(hostile)
    assert equations(f"open('{opened}','w') = 1 and 2 ** 3 = 8") == []
    assert not opened.exists() and not touched.exists()
    assert safe_arith("(1 + 2) * 3 - 4 / 2") == 7.0 and safe_arith("-(2.5)") == -2.5
    assert safe_arith("1 / 0") is None


def test_method_vs_control_net_fixes_and_exact_mcnemar():
    ids = [f"p{i}" for i in range(30)]
    base = {i: dict(id=i, correct=k < 10) for k, i in enumerate(ids)}
    method = {i: dict(id=i, correct=k < 8 or 10 <= k < 22) for k, i in enumerate(ids)}  # +12 fixed, -2 broken
    control = {i: dict(id=i, correct=k < 9 or 10 <= k < 12) for k, i in enumerate(ids)}  # +2, -1
    got = method_vs_control(method, control, base)
    assert (got["net_fixes_method"], got["net_fixes_control"]) == (10, 1)
    assert (got["method_only_right"], got["control_only_right"]) == (10, 1)
    assert got["mcnemar_p"] == pytest.approx(binomtest(10, 11, 0.5).pvalue)


def _write(path, recs):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs.values()))
    return str(path)


def test_cli_writes_json_figures_and_table_with_noise_floor_and_control(tmp_path, capsys):
    from lrs.cli import main

    noise = dict(BASE)
    noise["same"] = rec("same", [1, 2, 4, 4], True)  # the base rerun diverged once, unsteered
    control = {k: v | {"correct": BASE[k]["correct"]} for k, v in METHOD.items()}
    shadow = {
        k: v | {"events": [dict(t=t, r=0.4, steered=False) for t in range(len(v["token_ids"]))]}
        for k, v in BASE.items()
    }
    args = [
        "analyze",
        "rectify",
        "--base",
        _write(tmp_path / "base.jsonl", shadow),
        "--method",
        _write(tmp_path / "lrs.jsonl", METHOD),
        "--control",
        _write(tmp_path / "random.jsonl", control),
        "--noise",
        _write(tmp_path / "base-bs4.jsonl", noise),
    ]
    assert main(args) == 0
    out = tmp_path / "rectify" / "lrs"
    res = json.loads((out / "rectify.json").read_text())
    assert res["format"] == "lrs.rectify/1" and res["runs"]["method"]["name"] == "lrs"
    assert res["runs"]["noise"]["divergence"]["diverged"] == 1 and res["runs"]["control"]["name"] == "random"
    assert (
        res["method_vs_control"]["method_only_right"] == 1
        and res["method_vs_control"]["control_only_right"] == 1
    )
    assert any("diverged before any steering event" in c for c in res["caveats"])
    names = set(res["figures"])
    assert {
        "F1-flip-method.png",
        "F2-forest.png",
        "F3-divergence.png",
        "F4-raster.png",
        "F5-fork.png",
    } <= names
    assert all((out / f).stat().st_size > 1000 for f in names)
    table = capsys.readouterr().out
    assert "fixed" in table and "lrs vs random: net fixes +0 vs +0" in table
    # a run logged without --log-tokens is refused with one line
    bare = {k: {kk: vv for kk, vv in v.items() if kk != "token_ids"} for k, v in METHOD.items()}
    args[5] = _write(tmp_path / "bare.jsonl", bare)
    assert main(args) == 2
    assert "--log-tokens" in capsys.readouterr().err


def test_before_divergence_steered_and_shadow_runs_share_latents_and_rewards(tmp_path):
    """The invariant of ANALYSES.md §3.1 on a trained tiny run: before d the steered run's layer-L states (hence
    latents) equal the shadow base run's; its rewards equal the shadow's up to and including the first event
    (after it, LRS scores its own steered history, so r may differ even before d); no pair diverges before e1."""
    from conftest import build_trained_run, make_model, make_tokenizer

    import lrs.evaluate as ev
    from lrs.encoders import load_encoder
    from lrs.evaluate import EvalLog, evaluate
    from lrs.generation import layer_output
    from lrs.grading import Grade
    from lrs.models import decoder_layers
    from lrs.reward import load_reward_model
    from lrs.steering import LatentRewardSteerer, SteerConfig
    from lrs.tasks import load_task

    # steer block 0 of 2: a change can then also flip later tokens through block 1's keys/values (lag > 0)
    run = build_trained_run(tmp_path, limit=12, tokens=24, layers="0")
    enc, rm = (
        load_encoder(run["run"] / "encoder.safetensors"),
        load_reward_model(run["run"] / "reward.safetensors"),
    )
    model, tok = make_model("qwen2", hidden=32), make_tokenizer()
    probs = load_task("arith", "test", limit=6)
    mp = pytest.MonkeyPatch()
    mp.setattr(
        ev, "grade", lambda outs, golds: [Grade(None, len(o) % 3 == 0, "numeric", False) for o in outs]
    )
    block = decoder_layers(model)[enc.layer]
    try:
        runs = {}
        for alpha in (0.05, 0.3):
            st = LatentRewardSteerer(
                enc, rm, SteerConfig(k=2, alpha=alpha, tau_r=1.0, tau_c=0.0, warmup=2, every=3)
            )
            steered = LatentRewardSteerer(enc, rm, st.cfg, log_events=True)
            for name, kw in (
                ("lrs", dict(method="lrs", steerer=steered, log=EvalLog(tokens=True))),
                ("base", dict(log=EvalLog(tokens=True, shadow=st.shadow()))),
            ):
                states = []  # registered before the steerer's hook: sees block L's output before any change
                h = block.register_forward_hook(
                    lambda m, a, o, s=states: s.append(layer_output(o)[:, -1].clone())
                )
                try:
                    res = evaluate(model, tok, probs, max_new_tokens=40, batch_size=6, progress=False, **kw)
                finally:
                    h.remove()
                runs[(alpha, name)] = (res, torch.stack(states, dim=1))  # [B, steps, d], rows in batch order
    finally:
        mp.undo()
    order = sorted(
        range(len(probs)), key=lambda i: len(res["records"][i]["prompt"])
    )  # generate()'s batch rows
    lags = []
    for alpha in (0.05, 0.3):
        (lrs_res, lrs_h), (base_res, base_h) = runs[(alpha, "lrs")], runs[(alpha, "base")]
        summary = compare_runs(
            {r["id"]: r for r in base_res["records"]}, {r["id"]: r for r in lrs_res["records"]}
        )
        assert summary["nondeterministic"] == 0
        for row, i in enumerate(order):
            b, m = base_res["records"][i], lrs_res["records"][i]
            p = analyse_pair(b, m)
            d = p["d"] if p["d"] is not None else len(b["token_ids"])
            assert p["e1"] is not None and d >= p["e1"]
            # latents: every position up to d (state d is computed from the shared token d-1)
            z_base, z_lrs = enc.encode(base_h[row, : d + 1]), enc.encode(lrs_h[row, : d + 1])
            assert torch.equal(z_base, z_lrs)
            for e in m["events"]:  # the logged pre-steer latent of each event before d is the shadow's latent
                if e["steered"] and e["t"] <= d:
                    assert e["z_pre"] == pytest.approx(z_base[e["t"]].tolist(), abs=1e-4)
            # rewards: identical through the first event
            e1 = p["e1"]
            assert [x["r"] for x in m["events"][: e1 + 1]] == [x["r"] for x in b["events"][: e1 + 1]]
            if p["lag"] is not None:
                lags.append(p["lag"])
    assert lags and max(lags) > 0  # some flips are delayed: the check covers positions between e1 and d


def test_runs_without_token_logs_are_compared_on_retokenised_text(tmp_path, capsys):
    from conftest import make_tokenizer

    from lrs.cli import main

    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)  # byte-level: one token per character
    base = {"a": dict(id="a", correct=False, pred="5", output="2+2=5 so \\boxed{5}"),
            "b": dict(id="b", correct=True, pred="7", output="3+4=7 so \\boxed{7}")}  # fmt: skip
    lrs = {"a": dict(id="a", correct=True, pred="4", output="2+2=4 so \\boxed{4}"),
           "b": dict(id="b", correct=True, pred="7", output="3+4=7 so \\boxed{7}")}  # fmt: skip
    args = ["analyze", "rectify", "--base", _write(tmp_path / "base.jsonl", base),
            "--method", _write(tmp_path / "lrs.jsonl", lrs), "--no-figures"]  # fmt: skip
    assert main([*args, "--retokenize"]) == 2
    assert "--retokenize needs --tokenizer" in capsys.readouterr().err
    assert main([*args, "--retokenize", "--tokenizer", str(tok_dir)]) == 0
    assert "re-tokenised output text" in capsys.readouterr().out
    res = json.loads((tmp_path / "rectify" / "lrs" / "rectify.json").read_text())
    rows = {r["id"]: r for r in res["runs"]["method"]["pairs"]}
    assert rows["a"]["d"] == 4 and rows["a"]["category"] == "fixed"  # "2+2=" shared, then "5" vs "4"
    assert rows["b"]["d"] is None and rows["b"]["events"] is None  # identical text; no events were logged
    assert rows["a"]["error_type"] == "arithmetic" and "retokenized" in res
