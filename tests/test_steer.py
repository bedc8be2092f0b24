"""Latent reward steering on tiny random models: where the state changes, by how much, and what never changes."""

import pytest
import torch
from conftest import ForceToken, Spy, make_model, make_tokenizer
from transformers import GenerationConfig

import lrs.generation
from lrs.encoders import IdentityEncoder, TopKSAE
from lrs.errors import LRSError
from lrs.generation import eos_ids, generate, layer_output
from lrs.models import decoder_layers
from lrs.reward import RewardConfig, RewardModel
from lrs.steering import DiffMeanSteerer, Gate, LatentRewardSteerer, SteerConfig, SteeringVectors

LAYER = 1
QUESTIONS = ["What is 2+3?", "hi", "a much longer question about numbers and apples"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(arch="qwen2", n=8, kind="causal"):
    model, tok = make_model(arch), make_tokenizer()
    torch.manual_seed(1)
    enc = TopKSAE(32, n_latents=n, k=3, layer=LAYER)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.3)
    enc.requires_grad_(False)
    rm = RewardModel(
        n, RewardConfig(kind=kind, d_model=16, n_layers=1, n_heads=2, window=16, dropout=0.0)
    ).eval()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return model, tok, enc, rm, prompts


class Capture:
    """Hook on block L recording its output; registered before the steerer sees the input, after it the output."""

    def __init__(self):
        self.calls = []

    def __call__(self, module, args, output):
        self.calls.append(layer_output(output).detach().clone())


def _run(model, tok, prompts, steerer, n_tokens=10):
    block = decoder_layers(model)[LAYER]
    before, after = Capture(), Capture()
    h1 = block.register_forward_hook(before)
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    try:
        with steerer.apply(model, tok):
            h2 = block.register_forward_hook(after)
            try:
                with torch.no_grad():
                    model.generate(
                        **enc, max_new_tokens=n_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                    )
            finally:
                h2.remove()
    finally:
        h1.remove()
    return before.calls, after.calls


def test_change_equals_decoded_delta_only_on_gated_rows_at_current_position():
    model, tok, enc, rm, prompts = _setup()
    spy = Spy(enc)
    st = LatentRewardSteerer(spy, rm, SteerConfig(k=2, alpha=0.5, gate="always", warmup=2, every=1))
    st.gate.fires = lambda r, c: torch.tensor([True, False, True])  # rows 0 and 2 gated, row 1 never
    before, after = _run(model, tok, prompts, st)
    # prefill (prompt positions, including padding) untouched
    assert torch.equal(before[0], after[0])
    steered_calls = 0
    deltas = iter(spy.deltas)
    for s in range(1, len(before)):
        diff = after[s] - before[s]
        assert diff.shape[1] == 1  # decode step: only the current position exists
        if s < 2:  # warm-up
            assert torch.equal(diff, torch.zeros_like(diff))
            continue
        dh = next(deltas)
        assert torch.equal(diff[1], torch.zeros_like(diff[1]))  # ungated row unchanged
        torch.testing.assert_close(diff[[0, 2], -1], dh, rtol=0, atol=1e-6)
        assert dh.norm(dim=-1).min() > 0
        steered_calls += 1
    assert steered_calls == len(before) - 2
    rows = st.row_stats()
    assert rows[0]["steers"] == steered_calls and rows[1]["steers"] == 0


def test_gradient_step_raises_the_reward():
    _, _, enc, rm, _ = _setup()
    ident = IdentityEncoder(8, normalize=False, rescale=False, layer=LAYER)  # z == h, so dh == dz
    st = LatentRewardSteerer(ident, rm, SteerConfig(k=3, alpha=0.3, gate="always"))
    from lrs.steering.latent import _BatchState

    torch.manual_seed(3)
    s = _BatchState(4, 16, 8, torch.device("cpu"))
    for t in range(6):
        s.push(torch.randn(4, 8), t)
    rows = torch.arange(4)
    h = s.z[:, -1].clone()
    dh, ok = st._delta(s, rows, h)
    assert ok.all()
    before = rm.score_last(s.z, s.valid, s.pos)
    z_new = s.z.clone()
    z_new[:, -1] += dh
    after = rm.score_last(z_new, s.valid, s.pos)
    assert (after > before).all()
    torch.testing.assert_close(dh.norm(dim=-1), torch.full((4,), 0.9), rtol=0, atol=0.3)


def test_batched_steering_matches_each_row_alone():
    model, tok, enc, rm, prompts = _setup("llama")
    cfg = SteerConfig(k=2, alpha=2.0, tau_r=0.6, tau_c=0.0, warmup=1, every=2)
    batched = generate(
        model,
        tok,
        prompts,
        max_new_tokens=12,
        batch_size=3,
        progress=False,
        context=LatentRewardSteerer(enc, rm, cfg).context,
    )
    plain = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    assert any(b.token_ids != p.token_ids for b, p in zip(batched, plain, strict=True))  # steering acted
    for i, p in enumerate(prompts):
        alone = generate(
            model,
            tok,
            [p],
            max_new_tokens=12,
            batch_size=1,
            progress=False,
            context=LatentRewardSteerer(enc, rm, cfg).context,
        )
        assert alone[0].token_ids == batched[i].token_ids


def test_finished_rows_are_never_steered():
    model, tok, enc, rm, prompts = _setup("llama")
    cfg = SteerConfig(gate="always", warmup=1, every=1)
    first = generate(
        model,
        tok,
        prompts,
        max_new_tokens=8,
        batch_size=3,
        progress=False,
        context=LatentRewardSteerer(enc, rm, cfg).context,
    )
    others = set(first[1].token_ids) | set(first[2].token_ids)
    # a token row 0 emits early and the other rows never do: make it row 0's stop token
    stop = next(
        t
        for j, t in enumerate(first[0].token_ids[1:6], 1)
        if t not in others and t not in first[0].token_ids[:j]
    )
    model.generation_config.eos_token_id = [stop, 258]
    st = LatentRewardSteerer(enc, rm, cfg)
    before, after = _run(model, tok, prompts, st, n_tokens=8)
    row0_stop = first[0].token_ids.index(stop)
    assert len(before) > row0_stop + 1  # other rows kept generating after row 0 stopped
    for s in range(row0_stop + 1, len(before)):  # calls that process row 0's stop token or padding
        assert torch.equal(after[s][0], before[s][0])
    assert not torch.equal(after[row0_stop][0], before[row0_stop][0])  # row 0 was steered while live
    assert st.row_stats()[0]["steer_steps"] == row0_stop


def test_nan_gradient_skips_row_and_counts():
    model, tok, enc, rm, prompts = _setup()
    with torch.no_grad():
        rm.head.weight.fill_(float("nan"))
    st = LatentRewardSteerer(enc, rm, SteerConfig(gate="always", warmup=1, every=1))
    before, after = _run(model, tok, prompts, st, n_tokens=5)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(a, b)
    assert st.stats()["nan_skipped"] > 0 and st.stats()["steered_tokens"] == 0


def test_random_control_has_same_norm_as_reward_direction():
    _, _, enc, rm, _ = _setup()
    from lrs.steering.latent import _BatchState

    s = _BatchState(3, 16, 8, torch.device("cpu"))
    for t in range(4):
        s.push(torch.randn(3, 8), t)
    h = torch.randn(3, 32)
    reward = LatentRewardSteerer(enc, rm, SteerConfig(gate="always"))
    rnd = LatentRewardSteerer(enc, rm, SteerConfig(gate="always", control="random"))
    d1, _ = reward._delta(s, torch.arange(3), h)
    d2, _ = rnd._delta(s, torch.arange(3), h)
    torch.testing.assert_close(d1.norm(dim=-1), d2.norm(dim=-1))
    cos = torch.nn.functional.cosine_similarity(d1, d2, dim=-1)
    assert cos.abs().max() < 0.9
    # matched: the random change lies in the decoder's span like LRS's (8 directions of the 32-d state)
    W = enc.W_dec.detach()
    for d in (d1, d2):
        coef = torch.linalg.lstsq(W, d.T).solution
        torch.testing.assert_close(W @ coef, d.T, rtol=1e-4, atol=1e-4)
    r = torch.randn(32, 3)
    assert (W @ torch.linalg.lstsq(W, r).solution - r).norm(dim=0).min() > 1e-2  # a random 32-d vector is not


def test_diffmean_adds_alpha_v_on_every_generated_token_only():
    model, tok, _, _, prompts = _setup()
    v = torch.randn(32)
    st = DiffMeanSteerer(v, LAYER, alpha=0.5)
    before, after = _run(model, tok, prompts, st, n_tokens=4)
    assert torch.equal(before[0], after[0])
    for b, a in zip(before[1:], after[1:], strict=True):
        torch.testing.assert_close(a - b, (0.5 * v).expand_as(a - b), rtol=0, atol=1e-5)


def test_width_mismatch_is_a_clear_error():
    model, tok, _, rm, prompts = _setup()
    wide = TopKSAE(64, n_latents=8, k=3, layer=LAYER)
    st = LatentRewardSteerer(wide, rm, SteerConfig())
    with pytest.raises(LRSError, match="hidden size"):
        generate(model, tok, prompts[:1], max_new_tokens=2, progress=False, context=st.context)


def test_gate_logic():
    g = Gate(0.5, 0.7)
    fires = g.fires(torch.tensor([0.4, 0.6, 0.6]), torch.tensor([0.9, 0.9, 0.5]))
    assert fires.tolist() == [True, False, True]
    assert Gate(mode="always").fires(torch.ones(2), torch.ones(2)).all()
    with pytest.raises(LRSError):
        Gate(mode="sometimes")


# ---- Steerer.apply() around plain model.generate ------------------------------------------------------------

ALWAYS = SteerConfig(gate="always", warmup=0, every=1)


def _steerer(kind, enc, rm, cfg=ALWAYS):
    if kind == "latent":
        return LatentRewardSteerer(enc, rm, cfg)
    torch.manual_seed(7)
    return DiffMeanSteerer(torch.randn(32) * 0.2, LAYER, alpha=0.5)


def _inputs(tok, prompts):
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def _gen(model, tok, enc, n, **kw):
    with torch.no_grad():
        return model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, **kw)


def _live_steps(out, prompt_len, stop):
    """Decode calls in which each row was still generating: (its tokens up to and including a stop) - 1."""
    steps = []
    for row in out[:, prompt_len:].tolist():
        k = next((i for i, t in enumerate(row) if t in stop), len(row) - 1)
        steps.append(k)
    return steps


def _no_lrs_hooks_left(model):
    blocks = decoder_layers(model)
    assert "generate" not in vars(model)
    assert model.generate.__func__ is type(model).generate
    assert not model._forward_pre_hooks
    assert not model.get_output_embeddings()._forward_hooks
    assert not any(b._forward_hooks for b in blocks)


@pytest.mark.parametrize("kind", ["latent", "vector"])
def test_apply_steers_every_live_decode_step(kind):
    model, tok, enc, rm, prompts = _setup("llama")
    st = _steerer(kind, enc, rm)
    inputs = _inputs(tok, prompts)
    p = inputs["input_ids"].shape[1]
    with st.apply(model, tok):
        out = _gen(model, tok, inputs, 9, logits_processor=[ForceToken(p, row=1, at=3, token=258)])
    steps = _live_steps(out, p, eos_ids(model, tok))
    assert steps[1] == 3 and max(steps) == 8  # row 1 stopped at its token 3, another row ran to the end
    stats = st.stats()
    assert stats["steered_tokens"] > 0
    assert stats["generated_steps"] == sum(steps)
    assert stats["steered_tokens"] == sum(steps)  # gate always, no warm-up, every token
    assert [st.row_stats()[i]["steer_steps"] for i in range(3)] == steps
    assert [st.row_stats()[i]["steers"] for i in range(3)] == steps
    if kind == "latent":
        assert stats["nan_skipped"] == 0 and stats["steer_rate"] == 1.0 and stats["mean_dh_norm"] > 0
    _no_lrs_hooks_left(model)


@pytest.mark.parametrize("kind", ["latent", "vector"])
def test_apply_accumulates_statistics_over_generate_calls(kind):
    model, tok, enc, rm, prompts = _setup("qwen2")
    cfg = SteerConfig(gate="always", warmup=1, every=2)  # steered_tokens != generated_steps
    calls = [(_inputs(tok, prompts[:2]), 6), (_inputs(tok, prompts[2:]), 9)]
    alone, outs = [], []
    for inputs, n in calls:
        st = _steerer(kind, enc, rm, cfg)
        with st.apply(model, tok):
            outs.append(_gen(model, tok, inputs, n))
        alone.append(st)
    both = _steerer(kind, enc, rm, cfg)
    with both.apply(model, tok):
        together = [_gen(model, tok, inputs, n) for inputs, n in calls]
    for a, b in zip(outs, together, strict=True):
        assert torch.equal(a, b)  # the second call is steered exactly as if it were alone
    for key in ("steered_tokens", "generated_steps"):
        assert both.stats()[key] == sum(s.stats()[key] for s in alone)
    assert both.stats()["generated_steps"] == 2 * 5 + 1 * 8  # 2 rows x 5 steps, 1 row x 8 steps
    if kind == "latent":
        assert 0 < both.stats()["steered_tokens"] < both.stats()["generated_steps"]
    rows = both.row_stats()
    expect = [*alone[0].row_stats().values(), *alone[1].row_stats().values()]
    assert sorted(rows) == [0, 1, 2]  # rows of both calls, in arrival order
    for i, want in enumerate(expect):
        assert rows[i] == pytest.approx(want)


@pytest.mark.parametrize(
    "refused",
    ["num_beams", "num_return_sequences", "use_cache", "inputs_embeds", "generation_config", "model_config"],
)
@pytest.mark.parametrize("kind", ["latent", "vector"])
def test_apply_refuses_modes_it_cannot_steer_per_row(kind, refused):
    model, tok, enc, rm, prompts = _setup("qwen2")
    st = _steerer(kind, enc, rm)
    inputs = _inputs(tok, prompts)
    kw = dict(max_new_tokens=4, pad_token_id=tok.pad_token_id)
    if refused == "num_beams":
        kw.update(num_beams=2, do_sample=False)
    elif refused == "num_return_sequences":
        kw.update(num_return_sequences=2, do_sample=True)
    elif refused == "use_cache":
        kw.update(use_cache=False, do_sample=False)
    elif refused == "generation_config":
        kw.update(generation_config=GenerationConfig(num_beams=2, max_new_tokens=4, pad_token_id=256))
    elif refused == "model_config":
        model.generation_config.num_return_sequences = 2
        model.generation_config.do_sample = True
    if refused == "inputs_embeds":
        args = dict(
            inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]),
            attention_mask=inputs["attention_mask"],
        )
    else:
        args = dict(inputs)
    forward_calls = []
    counter = model.register_forward_pre_hook(lambda m, a: forward_calls.append(1))
    with st.apply(model, tok):
        with pytest.raises(LRSError) as e, torch.no_grad():
            model.generate(**args, **kw)
        assert not forward_calls  # refused before any compute
        assert st.stats()["generated_steps"] == 0
        if refused == "model_config":
            model.generation_config.num_return_sequences = 1
            model.generation_config.do_sample = False
        _gen(model, tok, inputs, 4)  # the block is still usable after a refusal
    counter.remove()
    msg = str(e.value)
    assert "\n" not in msg
    assert "not supported" in msg or "use_cache=True" in msg
    assert st.stats()["generated_steps"] == 3 * 3
    _no_lrs_hooks_left(model)


def test_apply_restores_generate_after_the_block_and_after_errors():
    model, tok, enc, rm, prompts = _setup("qwen2")
    inputs = _inputs(tok, prompts)
    st = LatentRewardSteerer(enc, rm, ALWAYS)
    with st.apply(model, tok) as same:
        assert same is st
        assert "generate" in vars(model)  # the wrapper is on the instance only while the block is open
    _no_lrs_hooks_left(model)
    with pytest.raises(LRSError), st.apply(model, tok):
        _gen(model, tok, inputs, 3, num_beams=2)
    _no_lrs_hooks_left(model)
    with pytest.raises(RuntimeError, match="user error"), st.apply(model, tok):
        raise RuntimeError("user error")
    _no_lrs_hooks_left(model)
    wide = LatentRewardSteerer(TopKSAE(64, n_latents=8, k=3, layer=LAYER), rm, ALWAYS)
    with pytest.raises(LRSError, match="hidden size"), wide.apply(model, tok):
        pass  # refused on entry
    _no_lrs_hooks_left(model)
    plain = _gen(model, tok, inputs, 5)
    with st.apply(model, tok):
        steered = _gen(model, tok, inputs, 5)
    assert torch.equal(_gen(model, tok, inputs, 5), plain)  # nothing steers after the block
    assert not torch.equal(steered, plain)


def test_apply_restores_an_instance_level_generate():
    model, tok, enc, rm, prompts = _setup("qwen2")
    calls = []
    original = model.generate

    def patched(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    model.generate = patched
    st = DiffMeanSteerer(torch.randn(32), LAYER)
    with st.apply(model, tok):
        _gen(model, tok, _inputs(tok, prompts), 3)
    assert vars(model)["generate"] is patched and calls == [1]
    assert st.stats()["generated_steps"] == 3 * 2


@pytest.mark.parametrize("kind", ["latent", "vector"])
@pytest.mark.parametrize("path", ["apply", "generate"])
def test_a_broken_tracker_fails_instead_of_returning_unsteered_text(monkeypatch, kind, path):
    model, tok, enc, rm, prompts = _setup("qwen2")
    st = _steerer(kind, enc, rm)
    # every forward call looks like a prefill: the transformers 5.24 failure of the old tracker
    monkeypatch.setattr(lrs.generation, "past_length", lambda ids, kwargs: 0)
    with pytest.raises(LRSError, match="decode steps") as e:
        if path == "apply":
            with st.apply(model, tok):
                _gen(model, tok, _inputs(tok, prompts), 6)
        else:
            generate(model, tok, prompts, max_new_tokens=6, batch_size=3, progress=False, context=st.context)
    assert "\n" not in str(e.value)
    assert st.stats()["steered_tokens"] == 0
    _no_lrs_hooks_left(model)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_vectors_add_alpha_v_at_live_decode_positions_only(arch):
    model, tok, _, _, prompts = _setup(arch)
    torch.manual_seed(5)
    vecs = {0: torch.randn(32) * 0.1, 1: torch.randn(32) * 0.1}
    alpha = 0.7
    st = SteeringVectors(vecs, alpha)
    blocks = decoder_layers(model)
    before = {L: Capture() for L in vecs}
    after = {L: Capture() for L in vecs}
    handles = [blocks[L].register_forward_hook(before[L]) for L in vecs]
    inputs = _inputs(tok, prompts)
    p, n = inputs["input_ids"].shape[1], 8
    stop = ForceToken(p, row=0, at=2, token=258)  # row 0 ends with its token 2: live in calls 1 and 2 only
    with st.apply(model, tok):
        handles += [blocks[L].register_forward_hook(after[L]) for L in vecs]
        out = _gen(model, tok, inputs, n, logits_processor=[stop])
    for h in handles:
        h.remove()
    live_steps = _live_steps(out, p, eos_ids(model, tok))
    assert live_steps[0] == 2 and len(before[0].calls) == n
    for L, v in vecs.items():
        b, a = before[L].calls, after[L].calls
        assert torch.equal(a[0], b[0])  # prefill: prompt positions, padding included, untouched
        for s in range(1, n):
            diff = a[s] - b[s]
            assert diff.shape[1] == 1  # a decode call: only the current position
            for row in range(3):
                if s <= live_steps[row]:
                    torch.testing.assert_close(diff[row, -1], alpha * v, rtol=0, atol=1e-6)
                else:
                    assert torch.equal(diff[row], torch.zeros_like(diff[row]))  # finished: padding untouched
    assert [st.row_stats()[i]["steer_steps"] for i in range(3)] == live_steps
    assert st.stats()["steered_tokens"] == st.stats()["generated_steps"] == sum(live_steps)


def test_apply_never_steers_rows_finished_by_a_per_call_eos_token_id():
    model, tok, _, _, prompts = _setup("qwen2")
    st = DiffMeanSteerer(torch.randn(32) * 0.1, LAYER, alpha=0.5)
    inputs = _inputs(tok, prompts)
    p, stop = inputs["input_ids"].shape[1], 65  # 65 is no stop token of the model or the tokenizer
    with st.apply(model, tok):
        out = _gen(model, tok, inputs, 8, eos_token_id=[stop], logits_processor=[ForceToken(p, 0, 2, stop)])
    assert out[0, p + 3 :].eq(tok.pad_token_id).all()  # generate() finished row 0 with its token 2
    assert st.row_stats()[0]["steer_steps"] == 2
