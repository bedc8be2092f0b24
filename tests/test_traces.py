"""Trace collection: states aligned with tokens, shards + manifest, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import make_model, make_tokenizer
from safetensors.torch import load_file

from lrs.errors import LRSError
from lrs.generation import generate
from lrs.models import decoder_layers
from lrs.tasks import Problem, build_prompts
from lrs.traces import TraceSet, collect_traces

PROBLEMS = [
    Problem(
        id=f"toy/{i}",
        task="toy",
        question=f"What is {i} plus {i}?",
        answer=str(2 * i),
        solution=None,
        meta={},
    )
    for i in range(10)
]


def _collect(out, **kw):
    model, tok = make_model("qwen2"), make_tokenizer()
    return collect_traces(
        model, tok, PROBLEMS, out, layers=[0, 1], max_new_tokens=6, batch_size=3, progress=False, **kw
    )


def test_states_align_with_generated_tokens(tmp_path):
    ts = _collect(tmp_path / "t")
    assert len(ts) == 10 and ts.complete and ts.layers == [0, 1]
    model, tok = make_model("qwen2"), make_tokenizer()
    prompt = build_prompts(tok, [PROBLEMS[4]])[0]
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    trace = next(t for t in ts if t.problem_id == "toy/4")
    full = torch.cat([ids, trace.tokens.long()[None, :-1]], dim=1)
    with torch.no_grad():
        hs = model(full, output_hidden_states=True).hidden_states
    # state for generated token s = block-0 output (hidden_states[1]) at the position that predicts it
    # (the last entry of hidden_states has the final norm applied, so block 1 is not comparable there)
    expected = hs[1][0, ids.shape[1] - 1 :]
    torch.testing.assert_close(trace.hidden[0].float(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(trace.prompt[0], hs[1][0, : ids.shape[1]].mean(0), rtol=1e-4, atol=1e-4)
    assert trace.conf.shape == trace.tokens.shape and (trace.conf > 0).all() and (trace.conf <= 1).all()


def test_different_settings_in_same_dir_are_refused(tmp_path):
    _collect(tmp_path / "t")
    model, tok = make_model("qwen2"), make_tokenizer()
    with pytest.raises(LRSError, match="different settings.*max_new_tokens"):
        collect_traces(
            model,
            tok,
            PROBLEMS,
            tmp_path / "t",
            layers=[0, 1],
            max_new_tokens=7,
            batch_size=3,
            progress=False,
        )


def test_sampling_needs_temperature_and_empty_split_is_refused(tmp_path):
    model, tok = make_model("qwen2"), make_tokenizer()
    with pytest.raises(LRSError, match="temperature"):
        collect_traces(model, tok, PROBLEMS, tmp_path / "a", samples_per_problem=3)
    with pytest.raises(LRSError, match="no problems"):
        collect_traces(model, tok, [], tmp_path / "b")


KILLED_RUN = textwrap.dedent(
    """
    import sys, time, torch
    sys.path.insert(0, {tests!r})
    from conftest import make_model, make_tokenizer
    from test_traces import PROBLEMS
    import lrs.traces as tr
    real = tr.atomic_write_json
    def slow(path, obj):
        real(path, obj)
        print("batch", len(obj["batches"]), flush=True)
        time.sleep(0.5)
    tr.atomic_write_json = slow
    tr.collect_traces(make_model("qwen2"), make_tokenizer(), PROBLEMS, {out!r}, layers=[0, 1], max_new_tokens=6,
                      batch_size=3, progress=False, samples_per_problem=2, temperature=1.0, seed=3)
    """
)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    out_killed, out_ref = tmp_path / "killed", tmp_path / "ref"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(out_killed))
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},
    )
    t0 = time.time()
    while time.time() - t0 < 120:
        line = proc.stdout.readline()
        if line.startswith("batch 2"):
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((out_killed / "manifest.json").read_text())
    assert 0 < len(partial["batches"]) < partial["n_batches"]  # really killed mid-run

    model, tok = make_model("qwen2"), make_tokenizer()
    kw = dict(
        layers=[0, 1],
        max_new_tokens=6,
        batch_size=3,
        progress=False,
        samples_per_problem=2,
        temperature=1.0,
        seed=3,
    )
    resumed = collect_traces(model, tok, PROBLEMS, out_killed, **kw)
    ref = collect_traces(model, tok, PROBLEMS, out_ref, **kw)
    assert resumed.records == ref.records and len(ref) == 20
    for b_res, b_ref in zip(resumed.manifest["batches"], ref.manifest["batches"], strict=True):
        a, b = load_file(str(out_killed / b_res["shard"])), load_file(str(out_ref / b_ref["shard"]))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out_killed.glob("*.tmp*"))
    assert resumed.fingerprint() == ref.fingerprint()


def test_states_subsample_and_missing_layer(tmp_path):
    ts = TraceSet(_collect(tmp_path / "t").path)
    x = ts.states(1)
    assert x.shape == (sum(r["length"] for r in ts.records), 32)
    assert ts.states(1, max_states=7).shape == (7, 32)
    with pytest.raises(LRSError, match="layer 5 was not collected"):
        ts.states(5)
    with pytest.raises(LRSError, match="no trace collection"):
        TraceSet(tmp_path / "nothing")


def test_collection_does_not_change_generation(tmp_path):
    model, tok = make_model("llama"), make_tokenizer()
    ts = collect_traces(
        model, tok, PROBLEMS[:4], tmp_path / "t", layers=[1], max_new_tokens=6, batch_size=2, progress=False
    )
    assert len(decoder_layers(model)[1]._forward_hooks) == 0  # hooks removed
    plain = generate(
        model, tok, build_prompts(tok, PROBLEMS[:4]), max_new_tokens=6, batch_size=2, progress=False
    )
    by_id = {t.problem_id: t.tokens.tolist() for t in ts}
    assert [by_id[p.id] for p in PROBLEMS[:4]] == [g.token_ids for g in plain]


def test_changed_shard_is_refused_and_concurrent_collect_is_locked(tmp_path):
    out = tmp_path / "t"
    model, tok = make_model("qwen2"), make_tokenizer()

    def run():
        kw = dict(layers=[1], max_new_tokens=4, batch_size=3, progress=False)
        return collect_traces(model, tok, PROBLEMS[:3], out, **kw)

    assert len(list(run())) == 3
    import fcntl

    with open(out / ".lock", "w") as f:  # another process holds the directory
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LRSError, match="is in use by"):
            run()
    shard = out / "shard-00000.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(LRSError, match="does not match its sha256"):
        list(TraceSet(out))
