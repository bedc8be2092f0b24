"""Latent reward models: causality, sliding window, score_last, training, group split, save/load, the report."""

import json

import numpy as np
import pytest
import torch

from lrs.errors import LRSError
from lrs.reward import (
    RewardConfig,
    RewardModel,
    format_report,
    load_reward_model,
    save_reward_model,
    score_traces,
    split_by_group,
    train_reward_model,
)
from lrs.stats import auroc

SMALL = dict(d_model=16, n_heads=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def synth(n_problems=40, k=3, lengths=(20, 60), signal_from=10, latent_signal=1.5, prompt_signal=0.0, seed=0):
    """Traces whose label shows in latent 0 only from position `signal_from` on (and optionally in the prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = dict(latents=[], labels=[], groups=[], conf=[], prompt=[])
    for p in range(n_problems):
        for _ in range(k):
            y = int(torch.rand(1, generator=g) < 0.5)
            T = int(torch.randint(*lengths, (1,), generator=g))
            z = torch.randn(T, 4, generator=g)
            z[signal_from:, 0] += latent_signal * (2 * y - 1)
            prompt = torch.randn(8, generator=g)
            prompt[0] += prompt_signal * (2 * y - 1)
            out["latents"].append(z)
            out["labels"].append(y)
            out["groups"].append(f"p{p}")
            out["conf"].append(torch.rand(T, generator=g))
            out["prompt"].append(prompt)
    return out


def model(kind, **kw):
    torch.manual_seed(0)
    return RewardModel(4, RewardConfig(kind=kind, **(SMALL | kw))).eval()


@pytest.mark.parametrize("kind,sees_future", [("causal", False), ("mlp", False), ("bidirectional", True)])
def test_logit_at_t_uses_only_the_past_for_causal_and_mlp(kind, sees_future):
    rm, t = model(kind), 12
    z = torch.randn(2, 30, 4)
    z2 = z.clone()
    z2[:, t + 1 :] += 5 * torch.randn(2, 30 - t - 1, 4)
    a, b = rm(z)[:, : t + 1], rm(z2)[:, : t + 1]
    assert (not torch.equal(a, b)) == sees_future


def test_sliding_window_forgets_latents_older_than_the_window():
    rm, t, w = model("causal", window=8), 25, 8
    z = torch.randn(1, 30, 4)
    old = z.clone()
    old[:, : t - w + 1] += 5 * torch.randn(1, t - w + 1, 4)  # everything at or before t - window
    assert torch.equal(rm(z)[:, t], rm(old)[:, t])
    recent = z.clone()
    recent[:, t - 1] += 5.0
    assert not torch.allclose(rm(z)[:, t], rm(recent)[:, t])


def test_score_last_equals_forward_and_has_a_gradient():
    rm, w = model("causal", window=8), 8
    z = torch.randn(1, 40, 4)
    full = rm(z)[0]
    same = dict(rtol=0, atol=1e-6)  # fp32: equal up to summation order inside different-size matmuls
    for t in (7, 20, 39):  # a history of exactly the window
        pos = torch.arange(t - w + 1, t + 1)[None]
        got = rm.score_last(z[:, t - w + 1 : t + 1], torch.ones(1, w, dtype=torch.bool), pos)[0]
        torch.testing.assert_close(got, full[t], **same)
    long = torch.arange(40 - 20, 40)[None]  # a history longer than the window is cropped: same value
    torch.testing.assert_close(
        rm.score_last(z[:, 20:], torch.ones(1, 20, dtype=torch.bool), long)[0], full[39], **same
    )
    wrong_pos = torch.arange(8)[None]  # the absolute position matters, not the column
    assert not torch.allclose(
        rm.score_last(z[:, 32:], torch.ones(1, w, dtype=torch.bool), wrong_pos)[0], full[39]
    )
    hist = z[:, 32:].clone().requires_grad_(True)
    rm.score_last(hist, torch.ones(1, w, dtype=torch.bool), torch.arange(32, 40)[None]).sum().backward()
    assert hist.grad[0, -1].abs().sum() > 0


@pytest.mark.parametrize("kind", ["causal", "mlp", "bidirectional"])
def test_score_last_with_left_padding_matches_forward_on_the_short_trace(kind):
    rm = model(kind, window=8)
    short = [torch.randn(3, 4), torch.randn(8, 4)]
    hist = torch.zeros(2, 8, 4)
    valid = torch.zeros(2, 8, dtype=torch.bool)
    pos = torch.zeros(2, 8, dtype=torch.long)
    for i, s in enumerate(short):
        hist[i, 8 - len(s) :], valid[i, 8 - len(s) :], pos[i, 8 - len(s) :] = s, True, torch.arange(len(s))
    got = rm.score_last(hist, valid, pos)
    want = torch.stack([rm(s[None])[0, -1] for s in short])
    assert torch.isfinite(got).all()
    assert torch.allclose(got, want, atol=1e-6)


def test_causal_model_learns_the_label_only_once_it_appears():
    d = synth(n_problems=60)
    cfg = RewardConfig(window=32, epochs=12, **SMALL)
    rm, report = train_reward_model(d["latents"], d["labels"], d["groups"], cfg=cfg, progress=False)
    assert report["auroc"]["reward"]["16"] > 0.9  # label visible from position 10 on
    _, va = split_by_group(d["groups"], d["labels"], cfg.val_frac, cfg.seed)
    scores = score_traces(rm, [d["latents"][i] for i in va])
    y = np.array(d["labels"])[va]
    at = [auroc([float(s[t - 1]) for s in scores], y) for t in range(1, 17)]  # after t tokens
    assert abs(at[4] - 0.5) < 0.2  # t=5: nothing to see yet
    assert abs(np.mean(at[:10]) - 0.5) < 0.1 and min(at[11:]) > 0.9
    assert report["n_val"] == len(va) and report["best_epoch"] >= 1


def test_same_inputs_give_the_same_model():
    d = synth(n_problems=12)
    cfg = RewardConfig(window=16, epochs=2, d_model=16, n_heads=2)  # dropout on: seeded too
    a, ra = train_reward_model(d["latents"], d["labels"], d["groups"], cfg=cfg, progress=False)
    b, rb = train_reward_model(d["latents"], d["labels"], d["groups"], cfg=cfg, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values(), strict=True))
    assert ra == rb


def test_single_class_set_is_refused_with_the_counts():
    d = synth(n_problems=5)
    with pytest.raises(LRSError, match="found 0 correct and 15 wrong; collect more problems"):
        train_reward_model(d["latents"], [0] * 15, d["groups"], progress=False)


def test_bad_inputs_are_refused():
    d = synth(n_problems=3)
    with pytest.raises(LRSError, match="no traces"):
        train_reward_model([], [], [], progress=False)
    with pytest.raises(LRSError, match="9 traces, 8 labels"):
        train_reward_model(d["latents"], d["labels"][:-1], d["groups"], progress=False)
    with pytest.raises(LRSError, match="confidences"):
        train_reward_model(
            d["latents"], d["labels"], d["groups"], conf=[c[:-1] for c in d["conf"]], progress=False
        )


def test_group_split_keeps_every_problem_on_one_side():
    d = synth(n_problems=30)
    y = np.array(d["labels"])
    tr, va = split_by_group(d["groups"], y, 0.2, seed=3)
    assert sorted(tr + va) == list(range(len(y)))
    assert not {d["groups"][i] for i in tr} & {d["groups"][i] for i in va}
    assert len({d["groups"][i] for i in va}) == 6
    assert set(y[tr]) == set(y[va]) == {0, 1}
    assert split_by_group(d["groups"], y, 0.2, seed=3) == (tr, va)
    with pytest.raises(LRSError, match="at least 2 problems"):
        split_by_group(["a", "a"], [0, 1], 0.2, seed=0)


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    rm = model("causal", window=8)
    rm.set_standardisation(torch.randn(50, 4) * 3 + 1)
    path = save_reward_model(
        rm, tmp_path / "reward.safetensors", provenance=dict(layer=3), metrics=dict(val=0.7)
    )
    back = load_reward_model(path)
    z = torch.randn(2, 20, 4)
    assert torch.equal(rm(z), back(z))
    assert back.cfg == rm.cfg and back.provenance == {"layer": 3} and back.metrics == {"val": 0.7}
    assert torch.equal(load_reward_model(path.with_suffix(".json"))(z), rm(z))


def test_bad_reward_file_is_one_line_error(tmp_path):
    bad = tmp_path / "reward.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(LRSError, match="not an lrs reward model") as e:
        load_reward_model(bad)
    assert "\n" not in str(e.value)
    bad.with_suffix(".json").write_text(json.dumps(dict(format="lrs.reward/1", config={"n_latents": 4})))
    with pytest.raises(LRSError, match="not a readable safetensors file") as e:
        load_reward_model(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(LRSError, match="no reward model file"):
        load_reward_model(tmp_path / "missing.safetensors")


def _report(seed=0, **kw):
    d = synth(n_problems=30, lengths=(70, 90), seed=seed, **kw)
    cfg = RewardConfig(kind="mlp", epochs=6, lr=1e-2, **SMALL)
    _, report = train_reward_model(
        d["latents"], d["labels"], d["groups"], cfg=cfg, conf=d["conf"], prompt=d["prompt"], progress=False
    )
    return report


def test_report_says_when_the_prompt_alone_predicts_better():
    report = _report(
        latent_signal=0.0, prompt_signal=3.0
    )  # difficulty in the prompt, nothing in the reasoning
    a = report["auroc"]
    assert set(a) == {"reward", "confidence", "prompt", "prompt_conf"}
    assert a["prompt"]["64"] > 0.9 and a["reward"]["64"] < a["prompt"]["64"]
    assert report["n_val_at"]["64"] == report["n_val"] and report["n_val_at"]["128"] == 0
    assert a["reward"]["128"] is None  # undefined, not a number: no val trace is that long
    assert report["within"]["reward"]["64"]["groups"] > 0
    json.dumps(report, allow_nan=False)
    text = format_report(report)
    assert "prompt-only" in text and "prompt+conf" in text and "within@64" in text
    assert text.splitlines()[-1].startswith("verdict: reward model does NOT beat the prompt")
    assert "problem difficulty" in text.splitlines()[-1]


def test_report_says_when_the_reward_model_wins():
    report = _report(latent_signal=1.5, prompt_signal=0.0)
    assert report["auroc"]["reward"]["64"] > 0.9
    assert (
        report["within"]["reward"]["64"]["auroc"] > 0.9
    )  # signal is in the reasoning, so it holds per problem
    assert format_report(report).splitlines()[-1].startswith("verdict: reward model beats the best baseline")


def test_report_gives_ci_at_64_and_a_winner_needs_a_difference_ci_above_zero():
    report = _report(latent_signal=1.5, prompt_signal=0.0)
    ci = report["ci64"]
    lo, hi = ci["reward"]
    assert lo <= report["auroc"]["reward"]["64"] <= hi
    assert ci["reward-prompt"][0] > 0  # a real gap: the verdict may say "beats"
    assert "95% CI at t=64" in format_report(report)
    weak = _report(latent_signal=0.0, prompt_signal=0.0, seed=3)  # nothing anywhere: no significant win
    assert not weak["verdict"].startswith("reward model beats")


def test_heldout_set_repeats_the_report_on_other_problems_with_within_problem_pairs():
    train = synth(n_problems=30, lengths=(70, 90))
    held = synth(n_problems=12, k=4, lengths=(70, 90), seed=7)
    held["groups"] = [f"dev-{g}" for g in held["groups"]]
    cfg = RewardConfig(kind="mlp", epochs=6, lr=1e-2, **SMALL)
    _, report = train_reward_model(
        train["latents"], train["labels"], train["groups"], cfg=cfg,
        conf=train["conf"], prompt=train["prompt"], heldout=held, progress=False,
    )  # fmt: skip
    h = report["heldout"]
    assert h["n_val"] == 48 and h["n_val_problems"] == 12 and h["n_train"] == report["n_train"]
    assert h["auroc"]["reward"]["64"] > 0.9 and h["within"]["reward"]["64"]["groups"] >= 8
    lo, hi = h["within"]["reward"]["64"]["ci"]
    assert lo <= h["within"]["reward"]["64"]["auroc"] <= hi
    assert "above chance, so it does rank a problem's own traces" in h["verdict"]
    # the paired difference to confidence: same resampled problems for both scores
    d = h["within"]["reward"]["64"]["auroc"] - h["within"]["confidence"]["64"]["auroc"]
    dlo, dhi = h["within"]["reward-confidence"]["64"]["ci"]
    assert dlo <= d <= dhi and d > 0  # the synthetic reward sees the label better than confidence does
    assert f"within-problem reward - confidence [{dlo:+.3f}, {dhi:+.3f}]" in format_report(report)
    # also at t = 32 (traces are 70-90 tokens long, so t = 128 has no pair and is reported as empty)
    w32 = h["within"]["reward"]["32"]
    assert w32["groups"] >= 8 and w32["ci"][0] <= w32["auroc"] <= w32["ci"][1]
    d32 = h["within"]["reward-confidence"]["32"]["ci"]
    assert (
        f"t=32: reward [{w32['ci'][0]:.3f}, {w32['ci'][1]:.3f}], reward - confidence [{d32[0]:+.3f}"
        in format_report(report)
    )
    assert h["within"]["reward"]["128"]["pairs"] == 0 and h["within"]["reward"]["128"]["ci"] is None
    assert "within@128" in format_report(report)
    assert set(h["auroc"]) == {"reward", "confidence", "prompt", "prompt_conf"}
    assert "held-out AUROC" in format_report(report)
    json.dumps(report, allow_nan=False)


def test_heldout_set_sharing_a_problem_with_training_is_refused():
    train = synth(n_problems=10)
    held = synth(n_problems=3, seed=5)  # same ids p0..p2 as training problems
    with pytest.raises(LRSError, match="share 3 problems"):
        train_reward_model(train["latents"], train["labels"], train["groups"], heldout=held, progress=False)


def test_selection_reads_fixed_positions_only_and_report_is_problem_disjoint():
    from lrs.reward.model import SELECT_POSITIONS, _val_score
    from lrs.reward.train import split_three

    # "end" and positions few traces reach never influence selection
    assert _val_score({"16": 0.6, "32": 0.6, "64": 0.6, "128": 0.6, "256": 0.0, "end": 1.0}) == 0.6
    assert SELECT_POSITIONS == (16, 32, 64, 128)
    groups = [f"p{i // 3}" for i in range(90)]
    labels = [i % 2 for i in range(90)]
    fit, sel, rep = split_three(groups, labels, 0.2, 0.2, seed=0)
    gf, gs, gr = ({groups[i] for i in part} for part in (fit, sel, rep))
    assert not (gf & gs) and not (gf & gr) and not (gs & gr)
    assert sorted(fit + sel + rep) == list(range(90)) and len(gs) == len(gr) == 6
    assert (
        split_three(groups, labels, 0.2, 0.0, seed=0)[1] == split_three(groups, labels, 0.2, 0.0, seed=0)[2]
    )


def test_report_says_where_it_was_selected_and_drop_truncated_ablation(tmp_path):
    g = torch.Generator().manual_seed(0)
    latents, labels, groups, trunc = [], [], [], []
    for i in range(60):
        y = i % 2
        z = torch.randn(40, 4, generator=g)
        z[10:, 0] += 2.0 * y
        latents.append(z), labels.append(y), groups.append(f"p{i // 2}"), trunc.append(i % 5 == 0)
    cfg = RewardConfig(epochs=2, drop_truncated=True, use_position=False, **SMALL)
    rm, report = train_reward_model(latents, labels, groups, cfg=cfg, truncated=trunc, progress=False)
    assert report["selected_on"]["positions"] == [16, 32, 64, 128]
    assert report["report_split"].startswith("report") and report["drop_truncated"] is True
    assert report["use_position"] is False
    z = torch.randn(1, 20, 4)
    a = rm(z, positions=torch.arange(20)[None])
    b = rm(z, positions=torch.arange(20)[None] + 500)
    torch.testing.assert_close(a, b)  # without the position input, the index cannot matter
    assert "selected on" in format_report(report)


def difficulty_synth(n_problems=60, k=6, T=40, seed=0):
    """Latent 1 carries the problem's difficulty at every position (it sets the success rate); latent 0 shows
    the trace's own outcome from position 10 on. Steering needs a score that reads latent 0, not latent 1."""
    g = torch.Generator().manual_seed(seed)
    out = dict(latents=[], labels=[], groups=[])
    for p in range(n_problems):
        d = float(torch.randn(1, generator=g)) * 1.5
        for _ in range(k):
            y = int(torch.rand(1, generator=g) < torch.sigmoid(torch.tensor(2.5 * d)))
            z = torch.randn(T, 4, generator=g) * 0.5
            z[:, 1] += d
            z[10:, 0] += 0.8 * (2 * y - 1)
            out["latents"].append(z), out["labels"].append(y), out["groups"].append(f"p{p}")
    return out


def _sensitivity(rm, latents, j):
    """Mean change of the reward logit at positions >= 16 when latent j of every position moves by +1."""
    base = score_traces(rm, latents)
    moved = [z.clone() for z in latents]
    for z in moved:
        z[:, j] += 1.0
    shifted = score_traces(rm, moved)
    return float(np.mean([(b - a)[16:].mean() for a, b in zip(base, shifted, strict=True)]))


@pytest.mark.parametrize("kind", ["mlp", "causal"])
def test_centred_and_pairwise_objectives_read_the_trace_not_the_problem_difficulty(kind):
    d = difficulty_synth()
    held = difficulty_synth(n_problems=20, seed=3)
    sens = {}
    for objective in ("trajectory", "centred", "pairwise"):
        cfg = RewardConfig(kind=kind, objective=objective, epochs=8, lr=1e-2, window=32, **SMALL)
        rm, report = train_reward_model(d["latents"], d["labels"], d["groups"], cfg=cfg, progress=False)
        assert report["objective"] == objective
        metric = "AUROC" if objective == "trajectory" else "within-problem AUROC"
        assert report["selected_on"]["metric"] == metric
        sens[objective] = (_sensitivity(rm, held["latents"], 0), _sensitivity(rm, held["latents"], 1))
    # the trajectory objective leans on difficulty: an easier-looking problem raises its score
    ratio = {o: d / w for o, (w, d) in sens.items()}  # difficulty sensitivity per unit of trace sensitivity
    assert sens["trajectory"][0] > 0 and ratio["trajectory"] > 0.2, sens
    for objective in ("centred", "pairwise"):
        assert sens[objective][0] > 0, sens
        assert abs(ratio[objective]) < min(0.25, 0.6 * ratio["trajectory"]), (objective, sens)


def test_within_problem_objectives_refuse_one_trace_per_problem_and_record_the_objective(tmp_path):
    d = synth(n_problems=30, k=1)
    with pytest.raises(LRSError, match="centred objective needs problems with both right and wrong traces"):
        train_reward_model(d["latents"], d["labels"], d["groups"], cfg=RewardConfig(objective="centred"))
    with pytest.raises(LRSError, match="unknown reward objective 'nonsense'"):
        train_reward_model(d["latents"], d["labels"], d["groups"], cfg=RewardConfig(objective="nonsense"))
    d = synth(n_problems=20, k=4)
    cfg = RewardConfig(objective="pairwise", epochs=1, **SMALL)
    rm, _ = train_reward_model(d["latents"], d["labels"], d["groups"], cfg=cfg, progress=False)
    save_reward_model(rm, tmp_path / "rm.safetensors")
    assert load_reward_model(tmp_path / "rm.safetensors").cfg.objective == "pairwise"


def test_r_quantiles_calibrate_the_gate_on_unseen_traces_of_the_same_kind(tmp_path):
    from lrs.encoders import IdentityEncoder
    from lrs.reward.model import QUANTILE_FROM, reward_quantile
    from lrs.steering import LatentRewardSteerer, SteerConfig

    d = synth(n_problems=250, lengths=(70, 90))  # 50 selection problems: the calibration set
    cfg = RewardConfig(kind="mlp", epochs=3, lr=1e-2, **SMALL)
    rm, report = train_reward_model(d["latents"], d["labels"], d["groups"], cfg=cfg, progress=False)
    cal = report["r_quantiles"]
    assert cal["from_position"] == QUANTILE_FROM and cal["traces"] == "select" and len(cal["values"]) == 99
    assert cal["values"] == sorted(cal["values"])
    save_reward_model(rm, tmp_path / "rm.safetensors")  # the quantiles travel with the artefact
    rm = load_reward_model(tmp_path / "rm.safetensors")
    fresh = synth(n_problems=100, lengths=(70, 90), seed=11)
    r = torch.cat([torch.sigmoid(s[QUANTILE_FROM:]) for s in score_traces(rm, fresh["latents"])])
    for q in (0.1, 0.2, 0.5):
        tau = reward_quantile(rm, q)
        assert abs(float((r < tau).float().mean()) - q) < 0.02, q  # expected gate rate within 2 points
    enc = IdentityEncoder(4, layer=0)
    st = LatentRewardSteerer(enc, rm, SteerConfig(tau_r_quantile=0.2, tau_c=0.0))
    assert st.gate.tau_r == reward_quantile(rm, 0.2) and st.tau_r == st.gate.tau_r
    assert st.fingerprint()["config"]["tau_r_quantile"] == 0.2
    rm.metrics = {}
    with pytest.raises(LRSError, match="no r quantiles"):
        LatentRewardSteerer(enc, rm, SteerConfig(tau_r_quantile=0.2))
