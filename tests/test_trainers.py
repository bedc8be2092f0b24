"""RL trainers on tiny random models: objectives by hand, gradients, exactness of the hooks, learning, resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import make_model

from lrs.artifacts import load_artifact
from lrs.errors import LRSError
from lrs.generation import Generation, generate
from lrs.models import decoder_layers
from lrs.steering.vectors import SteeringVectors
from lrs.tasks import Problem, build_prompts
from lrs.trainers import (
    BiasVectors,
    TrainConfig,
    advantages,
    answer_stops,
    answer_text,
    k3,
    latro_loss,
    latro_rewards,
    layer_norms,
    logit_lens,
    make_params,
    matched_random_vectors,
    policy_gradient_loss,
    split_rationale,
    step_problems,
    token_logprobs,
    train,
    verifier_rewards,
)
from lrs.trainers.checkpoint import CKPT_FORMAT

PROBLEMS = [Problem(f"toy/{i}", "toy", f"q{i}", str(i)) for i in range(24)]
TIMING = ("t_generate", "t_reward", "t_fwd_bwd", "t_step", "gen_tok_s", "fwd_tok_s")


def peaked_model(seed: int = 0):
    """A tiny random model whose head is scaled up, so its next-token distributions can become peaked."""
    model = make_model("qwen2", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def target_reward(model, tok, n_targets: int = 4):
    """Toy reward: the fraction of completion tokens among the model's ``n_targets`` most frequent samples."""
    prompts = build_prompts(tok, PROBLEMS) * 4
    gens = generate(model, tok, prompts, max_new_tokens=8, batch_size=96, temperature=1.0, progress=False)
    targets = {t for t, _ in Counter(t for g in gens for t in g.token_ids).most_common(n_targets)}
    return lambda probs, gens: [sum(t in targets for t in g.token_ids) / len(g.token_ids) for g in gens]


def strip(log):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log]


# ---------------------------------------------------------------- objectives by hand


def test_advantages_equal_hand_computation():
    r = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]])
    rloo = advantages(r, "rloo")
    # rloo: r_i - mean of the other three
    assert torch.allclose(rloo[0], torch.tensor([4 / 3, -4 / 3, -4 / 3, 4 / 3]))
    assert torch.allclose(rloo[2], torch.tensor([-1 / 3, -1 / 3, 1.0, -1 / 3]))
    assert torch.allclose(advantages(r, "mean")[2], torch.tensor([-0.25, -0.25, 0.75, -0.25]))
    std = (4 / 3) ** 0.5  # unbiased std of [1, -1, -1, 1]
    assert torch.allclose(advantages(r, "grpo")[0], torch.tensor([1, -1, -1, 1]) / (std + 1e-4))
    assert torch.allclose(advantages(r, "mean") * 4 / 3, rloo)  # mean is rloo scaled by (K-1)/K
    for kind in ("rloo", "mean", "grpo"):
        assert torch.equal(advantages(r, kind)[1], torch.zeros(4))  # all-equal group: exactly zero
    with pytest.raises(LRSError):
        advantages(torch.ones(2, 1))


def test_latro_terms_equal_hand_computation():
    logp_y = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    logp_z = torch.tensor([-10.0, -12.0, -8.0, -9.0])
    ref_z = torch.tensor([-11.0, -12.0, -9.0, -7.0])
    finished = torch.tensor([True, True, False, True])
    r = latro_rewards(logp_y, logp_z, ref_z, finished, gamma=2.0, beta=0.1)
    # R = [-1, -2, 2 x mean(-1,-2,-3,-4) = -5, -4]; log-ratio = [1, 0, 1, -2]; r = R - 0.1 x log-ratio
    expected = torch.tensor([-1.1, -2.0, -5.1, -3.8])
    assert torch.allclose(r, expected)
    adv = advantages(r[None], "rloo")[0]
    total = -1.1 - 2.0 - 5.1 - 3.8
    assert torch.allclose(adv, torch.tensor([x - (total - x) / 3 for x in expected.tolist()]))
    loss = latro_loss(logp_z, logp_y, adv, 4, answer_weight=1.0)
    hand = -sum(a * z + y for a, z, y in zip(adv.tolist(), logp_z.tolist(), logp_y.tolist(), strict=True)) / 4
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert latro_loss(logp_z, logp_y, adv, 4, 0.0).item() == pytest.approx(
        -sum(a * z for a, z in zip(adv.tolist(), logp_z.tolist(), strict=True)) / 4, rel=1e-6
    )
    assert k3(torch.tensor(-1.0), torch.tensor(-1.5)).item() == pytest.approx(2.718281828**-0.5 + 0.5 - 1)
    assert k3(torch.tensor(-2.0), torch.tensor(-2.0)).item() == 0.0


def test_policy_gradient_loss_is_token_normalised():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = policy_gradient_loss(logp, mask, torch.tensor([2.0, -1.0]), n_tokens=10)
    assert loss.item() == pytest.approx(-(2 * -3.0 + -1 * -3.0) / 10)


def test_verifier_reward_reads_only_the_last_box():
    texts = ["so \\boxed{3} then \\boxed{4}", "the answer is 4", "\\boxed{5}", "\\boxed{4.0}."]
    rewards, correct = verifier_rewards(texts, ["4"] * 4)
    assert rewards == [1.0, -1.0, -1.0, 1.0] and correct == [True, False, False, True]


def test_split_rationale_stops_at_end_token_or_answer_template(tokenizer):
    tok, eos = tokenizer, tokenizer.eos_token_id
    ids = tok("abc. The answer is 5.", add_special_tokens=False)["input_ids"]
    z, fin, left = split_rationale(tok, ids + [eos], {eos}, ["The answer is", "\\boxed"])
    assert tok.decode(z) + left == "abc. " and fin
    z, fin, left = split_rationale(tok, ids[:4] + [eos, 65, 66], {eos}, ["The answer is"])
    assert z == ids[:4] and fin and left == ""
    z, fin, left = split_rationale(tok, ids[:6], {eos}, ["The answer is"])
    assert z == ids[:6] and not fin and left == ""
    # a stop inside a token: z ends before that token and the token's text before the stop is handed to y
    for text in ("so it is $\\boxed{5}$.", "x=5 \\boxed{5}", "ab\\boxed{5}"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        z, fin, left = split_rationale(tok, ids, {eos}, answer_stops("\\boxed{{gold}}"))
        assert fin and tok.decode(z) + left == text[: text.index("\\boxed")]
        assert answer_text("\\boxed{{gold}}", "5") == "\\boxed{5}"


def test_latro_rollout_answer_is_the_boxed_gold_where_the_model_would_write_it(tokenizer):
    """y = the cut token's leftover + the template, no end token by default; with --answer-end, + the end token."""
    from lrs.trainers.rl import _Trainer

    tok = tokenizer
    cfg = TrainConfig(objective="latro", prompts_per_step=2, k=2, max_new_tokens=16)
    tr = _Trainer(make_model(), tok, PROBLEMS, cfg, Path("."), None)
    try:
        text = "so it is $\\boxed{7}$."
        gen = Generation(text=text, token_ids=tok(text, add_special_tokens=False)["input_ids"], finished=True)
        (r,) = tr.rollouts([3], [gen])
        assert tok.decode(r.completion + r.answer) == "so it is $\\boxed{3}" and r.finished
        tr.cfg = replace(cfg, answer_end=True)
        (r,) = tr.rollouts([3], [gen])
        assert r.answer[-1] == tr.end
    finally:
        tr.params.close()


def test_step_problems_are_a_pure_function_of_seed_and_step():
    steps = [step_problems(10, 4, s, seed=3) for s in range(5)]
    assert steps == [step_problems(10, 4, s, seed=3) for s in range(5)]
    first_epoch = steps[0] + steps[1] + steps[2][:2]
    assert sorted(first_epoch) == list(range(10))  # every problem once per epoch
    assert steps != [step_problems(10, 4, s, seed=4) for s in range(5)]


# ---------------------------------------------------------------- log-probs, hooks and gradients


def test_token_logprobs_equal_unpadded_forward(tokenizer):
    model = make_model("qwen2")
    rows = [([5, 6, 7, 8, 9], [10, 11]), ([12, 13], [14, 15, 16, 17]), ([20, 21, 22], [23])]
    for temp in (1.0, 0.7):
        lp, valid = token_logprobs(model, rows, temperature=temp, pad_id=256)
        assert valid.sum(1).tolist() == [2, 4, 1]
        for i, (p, c) in enumerate(rows):
            with torch.no_grad():
                logits = model(torch.tensor([p + c])).logits[0].float() / temp
            ref = logits.log_softmax(-1)[len(p) - 1 : len(p) + len(c) - 1].gather(1, torch.tensor(c)[:, None])
            assert torch.allclose(lp[i, : len(c)].detach(), ref[:, 0], atol=1e-5)
            assert torch.all(lp[i, len(c) :] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_vectors_reproduce_base_logits_exactly(dtype):
    model = make_model("qwen2").to(dtype)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        base = model(ids).logits
        bias = BiasVectors(model)
        assert bias.vectors.dtype == torch.float32  # fp32 vectors on a bf16 model
        steered = model(ids).logits
        bias.close()
        after = model(ids).logits
    assert torch.equal(base, steered) and torch.equal(base, after)


def test_bias_vectors_act_like_a_down_proj_bias_at_every_position():
    model = make_model("qwen2")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.manual_seed(1)
    bias = BiasVectors(model, layers=[0, -1])
    with torch.no_grad():
        bias.vectors.normal_()
        hooked = model(ids).logits
    bias.close()
    blocks = decoder_layers(model)
    for i, L in enumerate(bias.layers):
        blocks[L].mlp.down_proj.bias = torch.nn.Parameter(bias.vectors[i].detach().clone())
    with torch.no_grad():
        with_bias = model(ids).logits
    assert bias.layers == [0, 1]
    assert torch.allclose(hooked, with_bias, atol=1e-5)


@pytest.mark.parametrize("param", ["bias", "lora"])
def test_gradients_reach_only_the_trained_parameters(param):
    model = make_model("qwen2")
    params = make_params(model, param, layers=[-1])
    trained = {id(p) for _, p in params.named_parameters()}
    rows = [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14])]
    lp, valid = token_logprobs(model, rows)
    policy_gradient_loss(lp, valid.float(), torch.tensor([1.0, -0.5]), 5).backward()
    for n, p in model.named_parameters():
        if id(p) not in trained:
            assert p.grad is None, n
    grads = [p.grad for _, p in params.named_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    if param == "lora":  # only the last block carries adapters
        assert all(".layers.1." in n for n, _ in params.named_parameters())
    params.close()


def test_zero_advantage_groups_give_an_exact_zero_gradient():
    model = make_model("qwen2")
    params = make_params(model, "bias", layers=None)
    lp, valid = token_logprobs(model, [([5, 6, 7], [8, 9]), ([10, 11], [12, 13, 14])])
    policy_gradient_loss(lp, valid.float(), torch.zeros(2), 5).backward()
    assert params.vectors.grad is not None and torch.count_nonzero(params.vectors.grad) == 0
    params.close()


def test_constant_reward_skips_every_group_and_leaves_the_parameters_untouched(tmp_path, tokenizer):
    cfg = TrainConfig(prompts_per_step=2, k=3, steps=2, max_new_tokens=4, lr=0.1)
    res = train(
        make_model(),
        tokenizer,
        PROBLEMS,
        cfg,
        tmp_path,
        reward_fn=lambda p, g: [1.0] * len(g),
        progress=False,
    )
    assert all(r["skipped_rollouts"] == 6 and r["zero_var_groups"] == 2 for r in res.log)
    assert all(r["grad_norm"] is None and r["fwd_tokens"] == 0 for r in res.log)
    assert all(torch.count_nonzero(v) == 0 for v in res.vectors.vectors.values())


# ---------------------------------------------------------------- training runs


@pytest.mark.parametrize("param,lr", [("bias", 0.1), ("lora", 0.02)])
def test_training_reward_rises_on_a_toy_reward(tmp_path, tokenizer, param, lr):
    model = peaked_model(seed=1)
    reward = target_reward(model, tokenizer)
    cfg = TrainConfig(param=param, prompts_per_step=4, k=4, steps=30, lr=lr, max_new_tokens=8, micro_batch=8)
    res = train(model, tokenizer, PROBLEMS, cfg, tmp_path, reward_fn=reward, progress=False)
    first = sum(r["reward_mean"] for r in res.log[:5]) / 5
    last = sum(r["reward_mean"] for r in res.log[-5:]) / 5
    assert last > first + 0.3 and last > 0.8, (first, last)
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 30
    if param == "bias":
        vecs = SteeringVectors.load(tmp_path / "vectors.safetensors")
        assert (
            vecs.source == "rl" and vecs.provenance["positions"] == "all" and sorted(vecs.vectors) == [0, 1]
        )
        assert torch.equal(vecs.vectors[1], res.vectors.vectors[1])
        prompts = build_prompts(tokenizer, PROBLEMS[:8])
        with contextlib.closing(BiasVectors.from_vectors(model, vecs.vectors)):  # training-time application
            gens = generate(
                model, tokenizer, prompts, max_new_tokens=8, batch_size=8, temperature=1.0, progress=False
            )
        assert sum(reward(None, gens)) / len(gens) > 0.8
    else:
        assert (tmp_path / "adapter" / "adapter_config.json").is_file()


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("param", ["bias", "lora"])
def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, tokenizer, param):
    cfg = TrainConfig(
        param=param, prompts_per_step=2, k=3, steps=6, lr=0.05, max_new_tokens=6, checkpoint_every=2
    )
    reward = lambda p, gens: [float(sum(t % 2 for t in g.token_ids)) for g in gens]  # noqa: E731
    ref = train(peaked_model(), tokenizer, PROBLEMS, cfg, tmp_path / "ref", reward_fn=reward, progress=False)

    def stop(rec):
        if rec["step"] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(
            peaked_model(),
            tokenizer,
            PROBLEMS,
            cfg,
            tmp_path / "run",
            reward_fn=reward,
            on_step=stop,
            progress=False,
        )
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())["step"] == 4
    res = train(peaked_model(), tokenizer, PROBLEMS, cfg, tmp_path / "run", reward_fn=reward, progress=False)
    assert strip(res.log) == strip(ref.log)  # step 5 was redone, not logged twice
    a, b = dict(res.model.named_parameters()), dict(ref.model.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    if param == "bias":
        assert all(torch.equal(res.vectors.vectors[L], ref.vectors.vectors[L]) for L in ref.vectors.vectors)
        assert any(torch.count_nonzero(v) for v in ref.vectors.vectors.values())


KILLED_RUN = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_trainers import PROBLEMS, peaked_model
    from conftest import make_tokenizer
    from lrs.trainers import TrainConfig, train

    def slow(rec):
        print("step", rec["step"], flush=True)
        time.sleep(0.4)

    cfg = TrainConfig(prompts_per_step=2, k=3, steps=8, lr=0.05, max_new_tokens=6, checkpoint_every=2)
    reward = lambda p, gens: [float(sum(t % 2 for t in g.token_ids)) for g in gens]
    train(peaked_model(), make_tokenizer(), PROBLEMS, cfg, {out!r}, reward_fn=reward, on_step=slow, progress=False)
    """
)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tokenizer):
    out = tmp_path / "killed"
    script = KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(out))
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    t0 = time.time()
    while time.time() - t0 < 60:
        line = proc.stdout.readline()
        if line.startswith("step 5") or not line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 4  # really killed mid-run

    cfg = TrainConfig(prompts_per_step=2, k=3, steps=8, lr=0.05, max_new_tokens=6, checkpoint_every=2)
    reward = lambda p, gens: [float(sum(t % 2 for t in g.token_ids)) for g in gens]  # noqa: E731
    res = train(peaked_model(), tokenizer, PROBLEMS, cfg, out, reward_fn=reward, progress=False)
    ref = train(peaked_model(), tokenizer, PROBLEMS, cfg, tmp_path / "ref", reward_fn=reward, progress=False)
    assert all(torch.equal(res.vectors.vectors[L], ref.vectors.vectors[L]) for L in ref.vectors.vectors)
    assert strip(res.log) == strip(ref.log)
    assert not list(out.rglob("*.tmp*"))


def test_a_run_stopped_early_can_be_finished_short_then_extended_to_the_same_result(tmp_path, tokenizer):
    """Stop at a checkpoint, finish there with fewer --steps (artefact = that checkpoint), later resume with
    more steps: the result equals an uninterrupted run (the warm-up is 1 step at both lengths)."""
    cfg = TrainConfig(prompts_per_step=2, k=3, steps=6, lr=0.05, max_new_tokens=6, checkpoint_every=2)
    reward = lambda p, gens: [float(sum(t % 2 for t in g.token_ids)) for g in gens]  # noqa: E731
    ref = train(peaked_model(), tokenizer, PROBLEMS, cfg, tmp_path / "ref", reward_fn=reward, progress=False)

    def stop(rec):
        if rec["step"] == 5:
            raise Interrupt

    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        train(peaked_model(), tokenizer, PROBLEMS, cfg, run, reward_fn=reward, on_step=stop, progress=False)
    short = train(peaked_model(), tokenizer, PROBLEMS, replace(cfg, steps=4), run, reward_fn=reward,
                  progress=False)  # fmt: skip
    assert len(short.log) == 4 and short.steps == 4
    ckpt = load_artifact(
        run / "checkpoints" / "step-000004.safetensors", format=CKPT_FORMAT, what="checkpoint"
    )
    saved = ckpt[0]["param.vectors"]  # [layers, d], layers in order
    assert torch.equal(torch.stack([short.vectors.vectors[L] for L in sorted(short.vectors.vectors)]), saved)
    with pytest.raises(LRSError, match="checkpoint at step 4, beyond --steps 3"):
        train(
            peaked_model(), tokenizer, PROBLEMS, replace(cfg, steps=3), run, reward_fn=reward, progress=False
        )
    full = train(peaked_model(), tokenizer, PROBLEMS, cfg, run, reward_fn=reward, progress=False)
    assert all(torch.equal(full.vectors.vectors[L], ref.vectors.vectors[L]) for L in ref.vectors.vectors)
    assert strip(full.log) == strip(ref.log)


def test_resume_refuses_other_settings(tmp_path, tokenizer):
    cfg = TrainConfig(prompts_per_step=2, k=2, steps=1, max_new_tokens=3)
    reward = lambda p, gens: [float(len(g.text)) for g in gens]  # noqa: E731
    train(make_model(), tokenizer, PROBLEMS, cfg, tmp_path, reward_fn=reward, progress=False)
    other = TrainConfig(prompts_per_step=2, k=2, steps=1, max_new_tokens=3, lr=0.5)
    with pytest.raises(LRSError, match="other settings") as e:
        train(make_model(), tokenizer, PROBLEMS, other, tmp_path, reward_fn=reward, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw",
    [
        dict(objective="latro", latro_beta=0.1, kl_coef=0.05),
        dict(objective="latro", param="lora", lr=0.01),
        dict(kl_coef=0.1, kl_mode="reward"),
        dict(kl_coef=0.1, kl_mode="loss", param="lora", lr=0.01),
    ],
)
def test_kl_and_latro_runs_log_finite_terms(tmp_path, tokenizer, kw):
    cfg = TrainConfig(**{**dict(prompts_per_step=2, k=3, steps=2, lr=0.05, max_new_tokens=8), **kw})
    reward = (
        None
        if kw.get("objective") == "latro"
        else (lambda p, gens: [float(g.token_ids[0] % 3) for g in gens])
    )
    res = train(peaked_model(), tokenizer, PROBLEMS, cfg, tmp_path, reward_fn=reward, progress=False)
    first, second = res.log
    assert first["kl"] == 0.0  # step 0: zero vectors, policy == reference
    assert second["kl"] is not None and torch.isfinite(torch.tensor(second["kl"]))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in res.log)
    if kw.get("kl_coef") and kw.get("kl_mode", "loss") == "loss":
        assert first["k3"] == 0.0 and second["k3"] >= 0
    if kw.get("objective") == "latro":
        assert first["logp_y"] < 0 and second["skipped_rollouts"] == 0


def test_config_errors_are_one_line():
    for kw in (
        dict(k=1),
        dict(param="full"),
        dict(objective="latro", kl_coef=0.1, kl_mode="reward"),
        dict(temperature=0.0),
    ):
        with pytest.raises(LRSError) as e:
            TrainConfig(**kw)
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------- analysis


def test_logit_lens_norms_and_matched_random_control(tokenizer):
    model = make_model("qwen2")
    W = model.lm_head.weight.detach()
    vecs = SteeringVectors({0: W[65] * 3, 1: W[200].clone()}, source="rl")
    assert layer_norms(vecs) == pytest.approx({0: float(W[65].norm() * 3), 1: float(W[200].norm())})
    lens = logit_lens(model, tokenizer, vecs, top=5)
    assert lens[0]["raw"]["cos"][0][0] == tokenizer.decode([65])
    assert lens[1]["raw"]["cos"][0][0] == tokenizer.decode([200])
    assert len(lens[0]["raw"]["dot"]) == 5 and lens[0]["norm"] is not None
    assert lens[0]["raw"]["dot_bottom"][0][1] <= lens[0]["raw"]["dot"][-1][1]
    ctrl = matched_random_vectors(vecs, seed=1)
    assert ctrl.source == "rl-random"
    assert layer_norms(ctrl) == pytest.approx(layer_norms(vecs), rel=1e-5)
    assert abs(torch.nn.functional.cosine_similarity(ctrl.vectors[0], vecs.vectors[0], dim=0)) < 0.9
    assert torch.equal(ctrl.vectors[1], matched_random_vectors(vecs, seed=1).vectors[1])
    every = SteeringVectors({0: W[65].clone()}, source="rl", positions="all")
    assert matched_random_vectors(every).positions == "all" and ctrl.positions == "generated"


def test_training_curves_draw_the_moving_mean_and_say_when_kl_is_off(tmp_path, monkeypatch):
    import matplotlib.axes

    from lrs.trainers import plot_curves

    log = [dict(step=s, reward_mean=-1 + s / 10, pass_rate=s / 20, kl=None) for s in range(1, 13)]
    drawn, texts = [], []
    real_plot, real_text = matplotlib.axes.Axes.plot, matplotlib.axes.Axes.text
    monkeypatch.setattr(
        matplotlib.axes.Axes, "plot", lambda self, *a, **k: drawn.append((a, k)) or real_plot(self, *a, **k)
    )
    monkeypatch.setattr(
        matplotlib.axes.Axes, "text", lambda self, *a, **k: texts.append(a) or real_text(self, *a, **k)
    )
    path = plot_curves(log, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot_curves([], tmp_path / "x.png") is None
    ma = [(a, k) for a, k in drawn if k.get("label") == "10-step mean"]
    assert len(ma) == 1 and list(ma[0][0][0]) == [10, 11, 12]
    assert ma[0][0][1] == pytest.approx(
        [sum(-1 + s / 10 for s in range(i - 9, i + 1)) / 10 for i in (10, 11, 12)]
    )
    assert any("not measured" in a[2] for a in texts)  # the KL panel of a run without KL


def test_resume_check_ignores_settings_that_do_not_matter_to_the_run():
    """A verifier run saved by an older lrs (no answer_end, the old LaTRO template) still resumes; a LaTRO run
    whose answer template changed does not; a setting missing from the checkpoint counts as its default."""
    from dataclasses import asdict

    from lrs.trainers.checkpoint import _changed

    old = asdict(TrainConfig())
    old.pop("answer_end")
    old["answer_template"] = "The answer is {gold}."
    assert _changed(old, TrainConfig(steps=80)) == []  # verifier: LaTRO settings and steps do not matter
    latro = dict(old, objective="latro")
    assert _changed(latro, TrainConfig(objective="latro")) == ["answer_template"]
    assert (
        _changed(dict(latro, answer_template=TrainConfig().answer_template), TrainConfig(objective="latro"))
        == []
    )
    assert _changed(old, TrainConfig(lora_rank=16)) == [] and _changed(old, TrainConfig(lr=0.5)) == ["lr"]


def test_latro_logs_the_pass_rate_of_the_sampled_answers(tmp_path, tokenizer, monkeypatch):
    """The reward is self-likelihood; the log still carries the checker's pass rate on the sampled texts
    (which run on past the cut to the model's own answer), computed on exactly the step's samples."""
    import lrs.trainers.rl as rl

    seen: list[list[str]] = []

    def fake(texts, golds):
        seen.append(list(texts))
        ok = [len(t) % 2 == 0 for t in texts]
        return [1.0 if c else -1.0 for c in ok], ok

    monkeypatch.setattr(rl, "verifier_rewards", fake)
    cfg = TrainConfig(objective="latro", prompts_per_step=2, k=3, steps=2, lr=0.05, max_new_tokens=8)
    res = train(peaked_model(), tokenizer, PROBLEMS, cfg, tmp_path, progress=False)
    assert len(seen) == 2 and all(len(t) == 6 for t in seen)
    for rec, texts in zip(res.log, seen, strict=True):
        assert rec["pass_rate"] == sum(len(t) % 2 == 0 for t in texts) / 6
