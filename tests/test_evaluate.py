"""Evaluation records and summaries, paired comparison, result round-trip, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import make_model, make_tokenizer

from lrs.errors import LRSError
from lrs.evaluate import PARTIAL_FORMAT, compare, evaluate, load_partial, load_result, summary_line
from lrs.tasks import Problem

PROBS = [Problem(id=f"p{i}", task="toy", question=f"q{i}", answer="7") for i in range(4)]


def test_evaluate_writes_and_reads_back(tmp_path, monkeypatch):
    import lrs.evaluate as ev
    from lrs.grading import Grade

    monkeypatch.setattr(
        ev, "grade", lambda outs, golds: [Grade("7", i < 3, "math-verify", False) for i in range(len(outs))]
    )
    res = evaluate(
        make_model("qwen2"), make_tokenizer(), PROBS, out_dir=tmp_path, max_new_tokens=3, progress=False
    )
    s = res["summary"]
    assert s["n"] == 4 and s["accuracy"] == 0.75 and s["ci95"][0] <= 0.75 <= s["ci95"][1]
    assert s["mean_tokens"] == 3 and s["truncated"] == 4 and s["max_new_tokens"] == 3
    back = load_result(tmp_path, "base")
    assert back["records"] == res["records"] and back["summary"]["accuracy"] == 0.75
    assert summary_line(s).startswith("base: accuracy 75.0%")
    assert s["boxed"] == 0 and "truncated 100.0%, \\boxed{} 0.0%" in summary_line(s)  # a random tiny model
    assert summary_line({**s, "boxed": 1}).endswith("\\boxed{} 25.0%")


def test_compare_counts_fixed_and_broken():
    base = {"records": [{"id": i, "correct": c} for i, c in enumerate([0, 0, 1, 1, 0])]}
    other = {"records": [{"id": i, "correct": c} for i, c in enumerate([1, 1, 1, 0, 0])]}
    cmp = compare(base, other)
    assert (cmp["fixed"], cmp["broken"]) == (2, 1) and cmp["mcnemar_p"] == 1.0
    with pytest.raises(LRSError, match="different problem sets"):
        compare(base, {"records": other["records"][:2]})


def test_empty_problem_list_is_refused():
    with pytest.raises(LRSError, match="no problems"):
        evaluate(make_model("qwen2"), make_tokenizer(), [], progress=False)


# ---- resume after a kill ---------------------------------------------------------------------------------

RESUME_KW = dict(max_new_tokens=6, batch_size=2, progress=False)


def fake_grade(outs, golds):
    """Deterministic, per-output (independent of batching) and fast: 'correct' when the output has even length."""
    from lrs.grading import Grade

    return [Grade(o[:2] or None, len(o) % 2 == 0, "numeric", False) for o in outs]


def resume_problems():
    from lrs.tasks import load_task

    return load_task("arith", "dev", limit=8)


def make_steerer():
    import torch

    from lrs.steering import DiffMeanSteerer

    return DiffMeanSteerer(torch.randn(32, generator=torch.Generator().manual_seed(0)) * 0.1, 1, 0.5)


def _run(out, steerer=None, **kw):
    return evaluate(
        make_model("qwen2"),
        make_tokenizer(),
        resume_problems(),
        out_dir=out,
        steerer=steerer,
        **RESUME_KW,
        **kw,
    )


def _interrupt_after(monkeypatch, n_batches):
    """Raise KeyboardInterrupt (what SIGINT does) right after the n-th batch reached the partial file."""
    import lrs.evaluate as ev

    real, seen = ev._append_partial, []

    def append(path, batch):
        real(path, batch)
        seen.append(batch)
        if len(seen) == n_batches:
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "_append_partial", append)
    return lambda: monkeypatch.setattr(ev, "_append_partial", real)


def _same_result(a_dir, b_dir, a, b):
    assert (a_dir / "base.jsonl").read_text() == (b_dir / "base.jsonl").read_text()
    for k in ("n", "accuracy", "ci95", "mean_tokens", "truncated", "cache_key"):
        assert a["summary"][k] == b["summary"][k], k
    assert not (a_dir / "base.partial.jsonl").exists()


KILLED_EVAL = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import make_model, make_tokenizer
    from test_evaluate import RESUME_KW, fake_grade, resume_problems
    import lrs.evaluate as ev
    ev.grade = fake_grade
    real = ev._append_partial
    def slow(path, batch):
        real(path, batch)
        print("batch", flush=True)
        time.sleep(0.5)
    ev._append_partial = slow
    ev.evaluate(make_model("qwen2"), make_tokenizer(), resume_problems(), out_dir={out!r}, **RESUME_KW)
    """
)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    import lrs.evaluate as ev

    killed, ref = tmp_path / "killed", tmp_path / "ref"
    tests = str(Path(__file__).parent)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_EVAL.format(tests=tests, out=str(killed))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": tests},
    )
    n, t0 = 0, time.time()
    while n < 2 and time.time() - t0 < 120:
        n += proc.stdout.readline().startswith("batch")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert n == 2 and not (killed / "base.jsonl").exists()
    kept = load_partial(killed / "base.partial.jsonl", _key(), resume_problems())
    assert 0 < len(kept) < 8  # really killed mid-run, finished batches kept

    monkeypatch.setattr(ev, "grade", fake_grade)
    resumed, full = _run(killed), _run(ref)
    assert resumed["summary"]["resumed_from"] == len(kept) and full["summary"]["resumed_from"] == 0
    _same_result(killed, ref, resumed, full)
    assert resumed["records"] == full["records"]


def _key(**kw):
    from lrs.evaluate import result_key

    key, _ = result_key(
        make_model("qwen2"),
        resume_problems(),
        method="base",
        max_new_tokens=RESUME_KW["max_new_tokens"],
        batch_size=RESUME_KW["batch_size"],
        seed=0,
        **kw,
    )
    return key


def test_partial_file_of_another_run_is_not_reused(tmp_path, monkeypatch):
    import lrs.evaluate as ev

    monkeypatch.setattr(ev, "grade", fake_grade)
    probs = resume_problems()
    bogus = dict(id=probs[0].id, output="BOGUS", correct=True, tokens=1, truncated=False)
    part = tmp_path / "a" / "base.partial.jsonl"
    part.parent.mkdir()
    head = dict(format=PARTIAL_FORMAT, cache_key="another-run", name="base", n=8)
    part.write_text(json.dumps(head) + "\n" + json.dumps({"i": 0, "record": bogus}) + "\n")
    res, ref = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert res["summary"]["resumed_from"] == 0 and "BOGUS" not in (tmp_path / "a" / "base.jsonl").read_text()
    _same_result(tmp_path / "a", tmp_path / "b", res, ref)


def test_truncated_last_line_is_ignored_and_its_batch_redone(tmp_path, monkeypatch):
    import lrs.evaluate as ev

    monkeypatch.setattr(ev, "grade", fake_grade)
    out = tmp_path / "a"
    restore = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(out)
    restore()
    part = out / "base.partial.jsonl"
    assert len(load_partial(part, _key(), resume_problems())) == 4
    text = part.read_text()
    part.write_text(text[:-15])  # killed in the middle of writing the last record
    assert len(load_partial(part, _key(), resume_problems())) == 3
    res, ref = _run(out), _run(tmp_path / "b")
    assert res["summary"]["resumed_from"] == 3
    _same_result(out, tmp_path / "b", res, ref)


def test_resumed_steering_totals_cover_all_problems(tmp_path, monkeypatch):
    import lrs.evaluate as ev

    monkeypatch.setattr(ev, "grade", fake_grade)
    out = tmp_path / "a"
    restore = _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        _run(out, make_steerer(), method="diffmean")
    restore()
    res = _run(out, make_steerer(), method="diffmean")
    ref = _run(tmp_path / "b", make_steerer(), method="diffmean")
    assert res["summary"]["resumed_from"] == 6
    assert (out / "diffmean.jsonl").read_text() == (tmp_path / "b" / "diffmean.jsonl").read_text()
    steps = res["summary"]["steering"]["generated_steps"]
    assert steps == ref["summary"]["steering"]["generated_steps"] > 0
    assert res["summary"]["steering"] == ref["summary"]["steering"]
    assert steps == sum(r["steer_steps"] for r in ref["records"])
    assert not (out / "diffmean.partial.jsonl").exists()


def test_generate_skips_finished_batches_and_reports_each_batch():
    from lrs.generation import generate

    model, tok = make_model("qwen2"), make_tokenizer()
    prompts = [f"prompt {'x' * i}" for i in range(5)]  # lengths order them 0..4: batches [0,1] [2,3] [4]
    full = generate(model, tok, prompts, max_new_tokens=4, batch_size=2, progress=False)
    seen = []
    part = generate(
        model,
        tok,
        prompts,
        max_new_tokens=4,
        batch_size=2,
        progress=False,
        skip={0, 1, 2},
        on_batch=lambda idx, gens: seen.append((idx, [g.token_ids for g in gens])),
    )
    assert part[0] is None and part[1] is None  # whole batch skipped
    assert [idx for idx, _ in seen] == [[2, 3], [4]]  # a batch only partly skipped is generated whole
    assert all(part[i].token_ids == full[i].token_ids for i in (2, 3, 4))
    assert all(ids == [full[i].token_ids for i in idx] for idx, ids in seen)


# ---- growing a finished result to more problems ------------------------------------------------------------


def test_a_larger_limit_grows_a_finished_result_generating_only_the_new_problems(tmp_path, monkeypatch):
    import lrs.evaluate as ev
    import lrs.generation as gen

    monkeypatch.setattr(ev, "grade", fake_grade)
    probs = resume_problems()
    kw = dict(out_dir=tmp_path, method="diffmean", **RESUME_KW)
    model, tok = make_model("qwen2"), make_tokenizer()
    small = evaluate(model, tok, probs[:5], steerer=make_steerer(), **kw)
    asked = []
    real = gen.generate

    def counting(model, tok, prompts, **k):
        asked.append(len(prompts))
        return real(model, tok, prompts, **k)

    monkeypatch.setattr(ev, "generate", counting)
    big = evaluate(model, tok, probs, steerer=make_steerer(), **kw)
    assert asked == [3]  # only the three new problems were generated
    s = big["summary"]
    assert s["n"] == 8 and s["grown_from"] == {"n": 5, "cache_key": small["summary"]["cache_key"]}
    assert [r["id"] for r in big["records"]] == [p.id for p in probs]
    assert big["records"][:5] == small["records"]  # the earlier records are kept as they were
    alone = evaluate(model, tok, probs[5:], steerer=make_steerer(), **{**kw, "out_dir": tmp_path / "alone"})
    assert big["records"][5:] == alone["records"]  # the new ones are exactly a run on the new problems
    assert s["accuracy"] == sum(r["correct"] for r in big["records"]) / 8
    steps = sum(r["steer_steps"] for r in big["records"])
    assert s["steering"]["generated_steps"] == steps > 0  # totals over all eight problems
    assert load_result(tmp_path, "diffmean")["records"] == big["records"]
    assert not list(tmp_path.glob("*.grow*")) and not list(tmp_path.glob("*.partial*"))
    assert "5 problems from the earlier result" in summary_line(s)
    # the same run again is answered by the grown result; other settings do not grow (a fresh run)
    asked.clear()
    assert evaluate(model, tok, probs, steerer=make_steerer(), **kw).get("cached") and asked == []
    other = evaluate(model, tok, probs, steerer=make_steerer(), **{**kw, "max_new_tokens": 5})
    assert asked == [8] and "grown_from" not in other["summary"]


def test_a_changed_prompt_or_answer_is_never_grown_from(tmp_path, monkeypatch):
    import lrs.evaluate as ev

    monkeypatch.setattr(ev, "grade", fake_grade)
    probs = resume_problems()
    model, tok = make_model("qwen2"), make_tokenizer()
    evaluate(model, tok, probs[:4], out_dir=tmp_path, **RESUME_KW)
    path = tmp_path / "base.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[0]["prompt"] += " (an older template)"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    res = evaluate(model, tok, probs, out_dir=tmp_path, **RESUME_KW)
    assert "grown_from" not in res["summary"] and res["records"][0]["prompt"] != recs[0]["prompt"]
