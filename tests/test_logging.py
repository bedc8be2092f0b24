"""Token and steering-event logging in evaluations: what is logged, that it changes nothing, caching, sidecars."""

import json

import pytest
import torch
from conftest import make_model, make_tokenizer

import lrs.evaluate as ev
from lrs.encoders import TopKSAE
from lrs.evaluate import EvalLog, evaluate, load_latents, load_result, result_key
from lrs.generation import generate
from lrs.grading import Grade
from lrs.reward import RewardConfig, RewardModel
from lrs.steering import LatentRewardSteerer, SteerConfig
from lrs.tasks import Problem

PROBS = [Problem(id=f"p{i}", task="toy", question="q" * (3 * i + 1) + " what?", answer="7") for i in range(5)]
KW = dict(max_new_tokens=24, batch_size=2, progress=False)
# steers often on a tiny random model: gate on reward (tau_r above every r), from token 2, every 2 tokens
CFG = SteerConfig(k=2, alpha=1.0, tau_r=1.0, tau_c=0.0, warmup=2, every=2)


@pytest.fixture(autouse=True)
def fake_grading(monkeypatch):
    """Deterministic per-output grading without worker processes (even-length outputs are 'correct')."""
    monkeypatch.setattr(
        ev,
        "grade",
        lambda outs, golds: [Grade(o[:2] or None, len(o) % 2 == 0, "numeric", False) for o in outs],
    )


def _parts(n_latents: int = 8):
    torch.manual_seed(1)
    enc = TopKSAE(32, n_latents=n_latents, k=3, layer=1)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.3)
    enc.requires_grad_(False)
    rm = RewardModel(
        n_latents, RewardConfig(kind="causal", d_model=16, n_layers=1, n_heads=2, window=16, dropout=0.0)
    ).eval()
    return make_model("qwen2"), make_tokenizer(), enc, rm


def test_base_token_logging_changes_no_token_and_logs_the_model_probabilities():
    model, tok, _, _ = _parts()
    plain = evaluate(model, tok, PROBS, **KW)
    logged = evaluate(model, tok, PROBS, log=EvalLog(tokens=True), **KW)
    for a, b in zip(plain["records"], logged["records"], strict=True):
        assert a["output"] == b["output"] and a["tokens"] == b["tokens"]
        assert {
            k: v for k, v in b.items() if k not in ("token_ids", "finish_reason", "p_top1", "p_top2")
        } == a
        assert len(b["token_ids"]) == len(b["p_top1"]) == len(b["p_top2"]) == b["tokens"]
        assert tok.decode(b["token_ids"], skip_special_tokens=True) == b["output"]
        assert b["finish_reason"] == ("length" if b["truncated"] else "eos")
    # the logged probabilities are the model's own: teacher-force one record and compare the top two
    rec = logged["records"][0]
    prompt = tok(rec["prompt"], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + rec["token_ids"]])
    with torch.no_grad():
        probs = torch.softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    top = probs.topk(2, dim=-1).values
    assert rec["p_top1"] == pytest.approx(top[:, 0].tolist(), abs=2e-5)
    assert rec["p_top2"] == pytest.approx(top[:, 1].tolist(), abs=2e-5)
    assert probs.argmax(-1).tolist() == rec["token_ids"]  # greedy: the logged top-1 is the emitted token
    assert "log" not in plain["summary"]["key_parts"] and logged["summary"]["logging"] == {"tokens": True}


def test_lrs_logging_changes_no_token_and_logs_every_token_and_event():
    model, tok, enc, rm = _parts()
    plain = evaluate(model, tok, PROBS, method="lrs", steerer=LatentRewardSteerer(enc, rm, CFG), **KW)
    st = LatentRewardSteerer(enc, rm, CFG, log_events=True)
    logged = evaluate(model, tok, PROBS, method="lrs", steerer=st, log=EvalLog(tokens=True), **KW)
    assert plain["summary"]["steering"]["steered_tokens"] > 10
    for a, b in zip(plain["records"], logged["records"], strict=True):
        assert (a["output"], a["steers"], a["steer_steps"]) == (b["output"], b["steers"], b["steer_steps"])
        assert a["mean_dh"] == pytest.approx(b["mean_dh"], rel=1e-6)
        events = b["events"]
        assert [e["t"] for e in events] == list(range(b["tokens"]))  # one entry per generated token, in order
        assert events[0]["c"] is None and all(0 < e["c"] <= 1 for e in events[1:])
        # c is the previous token's top probability: the gate reads p_top1 shifted by one
        assert [e["c"] for e in events[1:]] == pytest.approx(b["p_top1"][:-1], abs=1e-4)
        steered = [e for e in events if e["steered"]]
        assert len(steered) == b["steers"]
        for e in steered:
            assert e["gate"] == "reward" and e["r"] < 1.0  # tau_c = 0: only the reward can open the gate
            assert e["dh"] > 0 and e["dh_rel"] > 0 and 0 < e["r_post"] < 1
            assert len(e["z_pre"]) == len(e["z_post"]) == 8 and e["z_pre"] != e["z_post"]
        assert all(e["dh"] == 0.0 and "r_post" not in e for e in events if not e["steered"])
    json.dumps(logged["records"])  # JSON-ready (latents inline for an 8-latent encoder)
    assert logged["summary"]["logging"] == {"tokens": True, "events": True}
    assert logged["summary"]["cache_key"] != plain["summary"]["cache_key"]


def test_event_logging_is_the_same_through_the_reward_cache_and_the_full_window(monkeypatch):
    """r and r_post are computed on different paths (incremental cache vs full window): they must agree."""
    model, tok, enc, rm = _parts()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p.question}], tokenize=False) for p in PROBS
    ]
    rows = []
    for incremental in (True, False):
        st = LatentRewardSteerer(enc, rm, CFG, log_events=True)
        if not incremental:
            monkeypatch.setattr(st, "_incremental_reward", lambda: None)
        out = generate(
            model, tok, prompts, max_new_tokens=20, batch_size=5, progress=False, context=st.context
        )
        rows.append((out, st.row_stats()))
    (out_i, rows_i), (out_f, rows_f) = rows
    assert [g.token_ids for g in out_i] == [g.token_ids for g in out_f]
    for k in rows_i:
        ei, ef = rows_i[k]["events"], rows_f[k]["events"]
        assert [e["steered"] for e in ei] == [e["steered"] for e in ef] and any(e["steered"] for e in ei)
        assert [e["r"] for e in ei] == pytest.approx([e["r"] for e in ef], abs=2e-4)
        post_i = [e["r_post"] for e in ei if e["steered"]]
        assert post_i == pytest.approx([e["r_post"] for e in ef if e["steered"]], abs=2e-4)


def test_shadow_scores_a_base_run_without_changing_it():
    model, tok, enc, rm = _parts()
    st = LatentRewardSteerer(enc, rm, CFG)
    plain = evaluate(model, tok, PROBS, **KW)
    shadow = evaluate(model, tok, PROBS, log=EvalLog(tokens=True, shadow=st.shadow()), **KW)
    for a, b in zip(plain["records"], shadow["records"], strict=True):
        assert a["output"] == b["output"] and "steers" not in b
        assert [e["t"] for e in b["events"]] == list(range(b["tokens"]))
        assert not any(e["steered"] for e in b["events"]) and all(0 < e["r"] < 1 for e in b["events"])
    assert "steering" not in shadow["summary"]
    assert shadow["summary"]["logging"]["shadow"]["config"]["gate"] == "never"
    with pytest.raises(ev.LRSError, match="unsteered runs"):
        evaluate(model, tok, PROBS, method="lrs", steerer=st, log=EvalLog(shadow=st.shadow()), **KW)


def test_a_result_without_logs_is_never_reused_for_a_run_that_asks_for_them(tmp_path):
    model, tok, _, _ = _parts()
    plain = evaluate(model, tok, PROBS, out_dir=tmp_path, **KW)
    key_plain, parts = result_key(model, PROBS, method="base", max_new_tokens=24, batch_size=2, seed=0)
    assert plain["summary"]["cache_key"] == key_plain and "log" not in parts  # unlogged keys are unchanged
    logged = evaluate(model, tok, PROBS, out_dir=tmp_path, log=EvalLog(tokens=True), **KW)
    assert not logged.get("cached") and "token_ids" in load_result(tmp_path, "base")["records"][0]
    # the logged result holds everything an unlogged run asks for: reused, and its logs are not overwritten
    again = evaluate(model, tok, PROBS, out_dir=tmp_path, **KW)
    assert again.get("cached") and "token_ids" in again["records"][0]
    # events from a steerer are asked for separately: a token-only log does not answer them
    _, _, enc, rm = _parts()
    evaluate(
        model, tok, PROBS, method="lrs", steerer=LatentRewardSteerer(enc, rm, CFG), out_dir=tmp_path, **KW
    )
    ev_run = evaluate(
        model,
        tok,
        PROBS,
        method="lrs",
        steerer=LatentRewardSteerer(enc, rm, CFG, log_events=True),
        out_dir=tmp_path,
        **KW,
    )
    assert not ev_run.get("cached") and "events" in ev_run["records"][0]


def _interrupt_after(monkeypatch, n_batches):
    real, seen = ev._append_partial, []

    def append(path, batch):
        real(path, batch)
        seen.append(batch)
        if len(seen) == n_batches:
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "_append_partial", append)
    return lambda: monkeypatch.setattr(ev, "_append_partial", real)


def test_wide_latents_go_to_a_sidecar_and_a_resumed_run_writes_the_same_files(tmp_path, monkeypatch):
    model, tok, enc, rm = _parts(n_latents=80)

    def run(out):
        st = LatentRewardSteerer(enc, rm, CFG, log_events=True)
        return evaluate(
            model, tok, PROBS, method="lrs", steerer=st, out_dir=out, log=EvalLog(tokens=True), **KW
        )

    whole = run(tmp_path / "a")
    z = load_latents(tmp_path / "a", "lrs")
    for rec in whole["records"]:
        assert rec["latents"] == "lrs.latents.safetensors"
        assert not any("z_pre" in e for e in rec["events"])
        assert z[rec["id"]]["z_pre"].shape == z[rec["id"]]["z_post"].shape == (rec["steers"], 80)
        torch.testing.assert_close(z[rec["id"]]["z_pre"], whole["latents"][rec["id"]]["z_pre"])
    restore = _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    restore()
    assert (tmp_path / "b" / "lrs.partial.jsonl.latents").is_dir()
    resumed = run(tmp_path / "b")
    assert resumed["summary"]["resumed_from"] == 2
    assert (tmp_path / "a" / "lrs.jsonl").read_text() == (tmp_path / "b" / "lrs.jsonl").read_text()
    zb = load_latents(tmp_path / "b", "lrs")
    assert zb.keys() == z.keys()
    for pid in z:
        assert torch.equal(z[pid]["z_pre"], zb[pid]["z_pre"]) and torch.equal(
            z[pid]["z_post"], zb[pid]["z_post"]
        )
    assert not (tmp_path / "b" / "lrs.partial.jsonl.latents").exists()


def test_cli_eval_logs_tokens_and_shadow_scores(tmp_path, capsys):
    from conftest import build_trained_run

    from lrs.cli import main

    run = build_trained_run(tmp_path, limit=12, tokens=24)
    common = [*run["common"], "--split", "test", "--limit", "4", "--max-new-tokens", "16"]
    out = tmp_path / "run" / "eval" / "arith" / "test"
    assert main(["eval", *common, "--method", "base"]) == 0
    assert main(["eval", *common, "--method", "base", "--shadow"]) == 0
    base = [json.loads(x) for x in (out / "base.jsonl").read_text().splitlines()]
    assert all(len(r["events"]) == len(r["token_ids"]) == r["tokens"] for r in base)
    steer = ["--alpha", "0.5", "--tau-r", "1.0", "--warmup", "1", "--every", "2"]
    assert main(["eval", *common, "--method", "lrs", "--log-tokens", *steer]) == 0
    lrs = [json.loads(x) for x in (out / "lrs.jsonl").read_text().splitlines()]
    assert all("p_top2" in r and sum(e["steered"] for e in r["events"]) == r["steers"] for r in lrs)
    capsys.readouterr()
    assert (
        main(["eval", *common, "--method", "lrs", *steer]) == 0
    )  # the logged result answers an unlogged run
    assert "cached" in capsys.readouterr().out
    assert main(["eval", *common, "--method", "lrs", "--shadow"]) == 2
    assert "--shadow scores an unsteered run" in capsys.readouterr().err


def test_a_grown_result_keeps_every_problems_wide_latents_in_its_own_sidecar(tmp_path):
    model, tok, enc, rm = _parts(n_latents=80)

    def run(probs):
        st = LatentRewardSteerer(enc, rm, CFG, log_events=True)
        return evaluate(model, tok, probs, method="lrs", steerer=st, out_dir=tmp_path, **KW)

    small = run(PROBS[:2])
    z_small = load_latents(tmp_path, "lrs")
    grown = run(PROBS)
    assert grown["summary"]["grown_from"]["n"] == 2
    z = load_latents(tmp_path, "lrs")
    assert set(z) == {r["id"] for r in grown["records"] if r["steers"]} and len(z) > len(z_small)
    for rec in grown["records"]:
        assert rec["latents"] == "lrs.latents.safetensors"
        assert z[rec["id"]]["z_pre"].shape == (rec["steers"], 80)
    for pid in z_small:  # the earlier problems' latents are the earlier run's
        assert torch.equal(z[pid]["z_pre"], z_small[pid]["z_pre"])
    assert small["records"] == grown["records"][:2]
    assert not (tmp_path / "lrs.grow.latents.safetensors").exists()
