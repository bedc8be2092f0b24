"""Latent reward steering on tiny random models: where the state changes, by how much, and what never changes."""

import pytest
import torch
from conftest import make_model, make_tokenizer

from lrs.encoders import IdentityEncoder, TopKSAE
from lrs.errors import LRSError
from lrs.generation import generate, layer_output
from lrs.models import decoder_layers
from lrs.reward import RewardConfig, RewardModel
from lrs.steering import DiffMeanSteerer, Gate, LatentRewardSteerer, SteerConfig

LAYER = 1
QUESTIONS = ["What is 2+3?", "hi", "a much longer question about numbers and apples"]


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


class Spy:
    """Wraps an encoder and records every decoded delta (what the steerer promises to add)."""

    def __init__(self, enc):
        self.enc, self.deltas = enc, []
        self.layer, self.d_model, self.n_latents, self.kind = enc.layer, enc.d_model, enc.n_latents, enc.kind

    def encode(self, h):
        return self.enc.encode(h)

    def decode_delta(self, z_new, z_old, h):
        d = self.enc.decode_delta(z_new, z_old, h)
        self.deltas.append(d.clone())
        return d


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
