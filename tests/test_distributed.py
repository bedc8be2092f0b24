"""Data-parallel collection and evaluation: N processes write exactly what one process writes."""

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import build_trained_run, make_model, make_tokenizer

from lrs.distributed import Share, share

#: summary fields that belong to the processes that ran, not to the result (see lrs.evaluate.evaluate)
PER_PROCESS = ("wall_time_s", "tokens_per_s", "threads", "processes")


def test_share_splits_batches_round_robin_and_reads_the_launcher_environment(monkeypatch):
    two = [Share(0, 2), Share(1, 2)]
    assert [b for b in range(5) if two[0].owns(b)] == [0, 2, 4] and [
        b for b in range(5) if two[1].owns(b)
    ] == [1, 3]
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert share() == Share(0, 1) and share().main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert share() == Share(1, 2) and not share().main


def _launch(args, nproc, port, cwd, *, script=None, env=None, ok=True):
    """``lrs ARGS`` (or ``python SCRIPT ARGS``) in one process, or under torchrun in ``nproc`` processes
    (``--`` before ARGS: torchrun's own parser would take lrs's ``--run`` for an abbreviation of ``--run-path``)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | (env or {})
    env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    target = [str(script)] if script else ["-m", "lrs.cli"]
    cmd = [sys.executable, *target, *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(port), *target, "--", *args]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    if ok:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_model("qwen2", hidden=32).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def _collect(model_dir, out, nproc, *extra, port=29517, **kw):
    args = ["collect", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--limit", "10",
            "--max-new-tokens", "12", "--batch-size", "3", "--layers", "1", "--samples-per-problem", "2",
            "--temperature", "0.8", "--out", str(out), *extra]  # fmt: skip
    _launch(args, nproc, port, out.parent, **kw)


def test_two_processes_collect_exactly_what_one_process_collects(model_dir, tmp_path):
    _collect(model_dir, tmp_path / "one", 1)
    _collect(model_dir, tmp_path / "two", 2)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert one["n_batches"] == 7 and len(one["batches"]) == 7  # 20 traces in batches of 3
    assert two == one  # same records, same shard names and sha256: the shards are byte-identical
    assert not list((tmp_path / "two").glob("manifest.rank*.json"))  # merged and removed


#: ``lrs`` with rollouts graded by output length (test_evaluate.fake_grade): the random model is never right,
#: and value labels that are all 0 would match whichever continuations were sampled
FAKE_ROLLOUT_GRADES = textwrap.dedent(
    """
    import sys

    import lrs.rollouts
    from lrs.cli import main
    from test_evaluate import fake_grade

    lrs.rollouts.grade = fake_grade
    sys.exit(main(sys.argv[1:]))
    """
)


def test_rollout_labels_are_sharded_with_their_batches(model_dir, tmp_path):
    script = tmp_path / "fake_rollout_grades.py"
    script.write_text(FAKE_ROLLOUT_GRADES)
    kw = dict(script=script, env={"PYTHONPATH": str(Path(__file__).parent)})
    rollouts = ("--rollouts", "2", "--rollout-every", "4")
    _collect(model_dir, tmp_path / "one", 1, *rollouts, **kw)
    _collect(model_dir, tmp_path / "two", 2, *rollouts, port=29535, **kw)
    one = json.loads((tmp_path / "one" / "manifest.json").read_text())
    two = json.loads((tmp_path / "two" / "manifest.json").read_text())
    values = [v for b in one["batches"] for t in b["traces"] for _, v in t["values"]]
    assert len(values) > 20 and 0 < sum(values) < len(values)  # labelled prefixes, some right, some wrong
    assert two == one


# ---- lrs eval --------------------------------------------------------------------------------------------


def _eval(model_dir, out, nproc, *extra, port=29531, run=None, **kw):
    args = ["eval", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--task", "arith",
            "--limit", "10", "--max-new-tokens", "10", "--batch-size", "3", "--out", str(out),
            "--run", str(run or out.parent / "run"), *extra]  # fmt: skip
    return _launch(args, nproc, port, out.parent, **kw)


def _same_result(one, two, name="base", also=()):
    """The 2-process result equals the 1-process one: same JSONL bytes, same summary but for what is per
    process (and ``also``), ``processes: 2`` only there, and no partial file left."""
    assert (two / f"{name}.jsonl").read_text() == (one / f"{name}.jsonl").read_text()
    s1 = json.loads((one / f"{name}.summary.json").read_text())
    s2 = json.loads((two / f"{name}.summary.json").read_text())
    assert s2["processes"] == 2 and "processes" not in s1
    skip = (*PER_PROCESS, *also)
    assert {k: v for k, v in s2.items() if k not in skip} == {k: v for k, v in s1.items() if k not in skip}
    assert not list(two.glob("*partial*"))
    return s1, s2


@pytest.fixture(scope="module")
def base_one(model_dir, tmp_path_factory):
    """The one-process `lrs eval --method base` every two-process run is compared with."""
    out = tmp_path_factory.mktemp("base") / "one"
    _eval(model_dir, out, 1)
    return out


def test_two_processes_evaluate_exactly_what_one_process_evaluates(model_dir, base_one, tmp_path):
    r = _eval(model_dir, tmp_path / "two", 2, port=29532)
    _, s2 = _same_result(base_one, tmp_path / "two")
    assert s2["n"] == 10 and s2["resumed_from"] == 0
    assert r.stdout.count("base: accuracy") == 1  # only the first process reports


def test_two_processes_steer_exactly_like_one_process(tmp_path):
    run = build_trained_run(tmp_path, limit=12, tokens=24, layers="-1")
    # the gate always fires (tau_r = 1 is above every reward), from the first token on
    steer = ("--method", "lrs", "--alpha", "0.5", "--tau-r", "1.0", "--warmup", "1", "--every", "1",
             "--log-tokens")  # fmt: skip
    _eval(run["model"], tmp_path / "one", 1, *steer, run=run["run"])
    _eval(run["model"], tmp_path / "two", 2, *steer, run=run["run"], port=29533)
    s1, s2 = _same_result(tmp_path / "one", tmp_path / "two", name="lrs")
    assert s2["steering"] == s1["steering"] and s1["steering"]["steered_tokens"] > 0


def test_two_processes_grow_a_result_exactly_like_one_process(model_dir, tmp_path):
    import shutil

    one, two = tmp_path / "one", tmp_path / "two"
    _eval(model_dir, one, 1, "--limit", "4")
    shutil.copytree(one, two)
    _eval(model_dir, one, 1)  # --limit 10: grows the 4-problem result
    r = _eval(model_dir, two, 2, port=29537)
    s1, s2 = _same_result(one, two)
    assert s1["grown_from"] == s2["grown_from"] and s2["grown_from"]["n"] == 4 and s2["n"] == 10
    assert r.stdout.count("base: accuracy") == 1 and not list(two.glob("*.grow*"))


KILL_AFTER_FIRST_BATCH = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path

    import lrs.evaluate as ev
    from lrs.cli import main

    real, flags = ev._append_partial, Path(os.environ["LRS_TEST_FLAGS"])

    def append(path, batch):  # every process dies once it and the others have one batch on disk
        real(path, batch)
        (flags / os.environ["RANK"]).touch()
        while len(list(flags.iterdir())) < int(os.environ["WORLD_SIZE"]):
            time.sleep(0.05)
        os._exit(1)

    ev._append_partial = append
    sys.exit(main(sys.argv[1:]))
    """
)


def test_killed_two_process_eval_resumes_to_the_one_process_result(model_dir, base_one, tmp_path):
    out, flags, script = tmp_path / "two", tmp_path / "flags", tmp_path / "killed.py"
    flags.mkdir()
    script.write_text(KILL_AFTER_FIRST_BATCH)
    r = _eval(model_dir, out, 2, port=29534, script=script, env={"LRS_TEST_FLAGS": str(flags)}, ok=False)
    assert r.returncode != 0 and not (out / "base.jsonl").exists()
    done = [[json.loads(x)["i"] for x in (out / f"base.partial.rank{r}.jsonl").read_text().splitlines()[1:]]
            for r in (0, 1)]  # fmt: skip
    assert len(done[0]) == len(done[1]) == 3 and not set(done[0]) & set(done[1])  # batch 0 and batch 1
    _eval(model_dir, out, 2, port=29536)
    _, s2 = _same_result(base_one, out, also=("resumed_from",))
    assert s2["resumed_from"] == 6


def test_processes_keep_and_merge_their_own_wide_latents(tmp_path, monkeypatch):
    """Two in-process "processes" (threads meeting at a thread barrier): per-process partial files and
    latents folders while running, one merged result and latents sidecar afterwards, equal to one process's."""
    import torch
    from test_evaluate import fake_grade
    from test_logging import CFG, KW, PROBS, _parts

    import lrs.evaluate as ev
    from lrs.evaluate import EvalLog, evaluate, load_latents
    from lrs.steering import LatentRewardSteerer

    monkeypatch.setattr(ev, "grade", fake_grade)
    meet, seen = threading.Barrier(2), []
    real_append = ev._append_partial

    def append(path, batch):
        seen.append(path.name)
        real_append(path, batch)

    monkeypatch.setattr(ev, "barrier", lambda sh: sh.world > 1 and meet.wait(timeout=300))
    monkeypatch.setattr(ev, "_append_partial", append)

    # 80 latents: events keep theirs in the sidecar, not inline; built here, as torch's global seed is shared
    parts = [_parts(80) for _ in range(3)]

    def run(out, ranks=None):
        model, tok, enc, rm = parts[ranks.rank if ranks else 2]
        st = LatentRewardSteerer(enc, rm, CFG, log_events=True)
        kw = dict(method="lrs", steerer=st, out_dir=out, log=EvalLog(tokens=True), ranks=ranks, **KW)
        return evaluate(model, tok, PROBS, **kw)

    one = run(tmp_path / "one")
    seen.clear()
    results = [None, None]
    threads = [threading.Thread(target=lambda r=r: results.__setitem__(r, run(tmp_path / "two", Share(r, 2))))
               for r in (0, 1)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # 3 batches in all (as one process): two in process 0's partial file, one in process 1's
    assert sorted(seen) == ["lrs.partial.rank0.jsonl"] * 2 + ["lrs.partial.rank1.jsonl"]
    assert (tmp_path / "two" / "lrs.jsonl").read_text() == (tmp_path / "one" / "lrs.jsonl").read_text()
    assert results[0]["records"] == results[1]["records"] == one["records"]
    assert results[1]["summary"]["steering"] == one["summary"]["steering"]
    z1, z2 = load_latents(tmp_path / "one", "lrs"), load_latents(tmp_path / "two", "lrs")
    assert z1.keys() == z2.keys() == results[1]["latents"].keys() and z1
    assert all(torch.equal(z1[k]["z_pre"], z2[k]["z_pre"]) for k in z1)
    assert not list((tmp_path / "two").glob("*partial*"))
