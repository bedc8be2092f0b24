"""Value labels: rollouts from exact token prefixes, hand-computed targets, the value objective, collection."""

import json
import math

import pytest
import torch
from conftest import make_model, make_tokenizer

import lrs.rollouts
from lrs.grading import Grade
from lrs.reward import RewardConfig, train_reward_model
from lrs.reward.train import _problem_offsets, value_targets
from lrs.rollouts import prefix_positions, rollout_values


def test_centred_offsets_and_value_targets_equal_hand_computed_values():
    import numpy as np

    groups = ["p0", "p0", "p0", "p1", "p1", "p2"]
    y = np.array([1, 0, 0, 1, 1, 0])
    off = _problem_offsets(groups, y, list(range(6)))
    assert off[:3].tolist() == pytest.approx([math.log(1 / 2)] * 3)  # logit(1/3)
    assert torch.isnan(off[3:]).all()  # p1 all right, p2 a single wrong trace: no within-problem signal
    tg = value_targets([[[2, 0.5], [4, 1.0]], None], [0, 1], [5, 3], max_len=1024)
    assert torch.equal(torch.isnan(tg[0]), torch.tensor([True, False, True, False, False]))
    assert tg[0][[1, 3, 4]].tolist() == [0.5, 1.0, 0.0]  # v after 2 and 4 tokens, then the trace's own label
    assert torch.isnan(tg[1][:2]).all() and tg[1][2] == 1.0
    assert prefix_positions(130, 64, 320) == [64, 128] and prefix_positions(64, 64, 320) == []


def test_rollouts_continue_the_exact_token_prefix_and_map_back_to_their_trace(monkeypatch):
    tok, model = make_tokenizer(), make_model()
    tok.padding_side = "left"
    prompts = ["Q: 1+1?", "Q: two plus three, please?"]
    completions = [tok("ABCDEFGHI")["input_ids"], tok("abcdefghijklmn")["input_ids"]]
    assert [len(c) for c in completions] == [9, 14]  # byte-level: one token per character
    seen = []

    def fake_grade(texts, golds):
        seen.extend(zip(texts, golds, strict=True))
        return [Grade("x", g == "yes", "numeric", False) for g in golds]

    monkeypatch.setattr(lrs.rollouts, "grade", fake_grade)
    vals = rollout_values(model, tok, prompts, completions, ["yes", "no"], m=3, every=4, max_new_tokens=12,
                          batch_size=5, seed=1)  # fmt: skip
    assert vals == [[[4, 1.0], [8, 1.0]], [[4, 0.0], [8, 0.0]]]  # positions < min(length, budget)
    assert len(seen) == 4 * 3  # M continuations per prefix
    for text, gold in seen:
        prefix = ("ABCD", "ABCDEFGH") if gold == "yes" else ("abcd", "abcdefgh")
        assert text.startswith(prefix), text  # the exact prefix tokens, then the sampled continuation
    again = []
    monkeypatch.setattr(lrs.rollouts, "grade", lambda t, g: again.extend(t) or fake_grade(t, g))
    rollout_values(model, tok, prompts, completions, ["yes", "no"], m=3, every=4, max_new_tokens=12,
                   batch_size=5, seed=1)  # fmt: skip
    assert again == [t for t, _ in seen[12:]]  # same seed and batches: the same continuations


def test_value_objective_fits_held_out_rollout_values():
    g = torch.Generator().manual_seed(0)
    lat, labels, groups, values = [], [], [], []
    for p in range(80):
        for _ in range(2):
            z = torch.randn(60, 4, generator=g)
            v_true = torch.sigmoid(2 * z[:, 0].cumsum(0) / torch.arange(1, 61).sqrt())  # drifts with latent 0
            vals = [[t, float(v_true[t - 1])] for t in (8, 16, 24, 32, 40, 48)]
            lat.append(z), groups.append(f"p{p}"), values.append(vals)
            labels.append(int(torch.rand(1, generator=g) < v_true[-1]))
    cfg = RewardConfig(kind="causal", objective="value", epochs=10, lr=3e-3, window=64, d_model=16, n_heads=2,
                       dropout=0.0)  # fmt: skip
    rm, report = train_reward_model(lat, labels, groups, cfg=cfg, values=values, progress=False)
    vf = report["value_fit"]
    assert vf["n_points"] == 6 * len([1 for _ in range(report["n_val"])])
    assert vf["pearson"] > 0.8 and vf["brier"] < 0.5 * vf["brier_constant"], vf
    with pytest.raises(Exception, match="needs value labels"):
        train_reward_model(lat, labels, groups, cfg=cfg, values=None, progress=False)


def test_collect_with_rollouts_stores_value_labels_per_trace(tmp_path, monkeypatch):
    import lrs.traces
    from lrs.tasks import load_task
    from lrs.traces import collect_traces

    tok, model = make_tokenizer(), make_model()
    tok.padding_side = "left"
    ok = lambda outs, golds: [Grade("1", i % 2 == 0, "numeric", False) for i in range(len(outs))]  # noqa: E731
    monkeypatch.setattr(lrs.traces, "grade", ok)
    monkeypatch.setattr(lrs.rollouts, "grade", ok)
    probs = load_task("arith", "train")[:3]
    ts = collect_traces(model, tok, probs, tmp_path / "t", layers=[1], max_new_tokens=20, batch_size=3,
                        rollouts=2, rollout_every=8, progress=False)  # fmt: skip
    assert ts.config["rollouts"] == 2 and ts.config["rollout_every"] == 8
    for r in ts.records:
        assert [t for t, _ in r["values"]] == prefix_positions(r["length"], 8, 20)
        assert all(v in (0.0, 0.5, 1.0) for _, v in r["values"])
    json.dumps(ts.manifest)
