"""Incremental causal reward scoring: equal to the full-window / full-trace scores, and the steerer's cheap path."""

import pytest
import torch
from conftest import Spy, make_model, make_tokenizer

from lrs.encoders import IdentityEncoder, TopKSAE
from lrs.generation import generate
from lrs.reward import RewardConfig, RewardModel, score_traces
from lrs.steering import LatentRewardSteerer, SteerConfig
from lrs.steering.latent import _BatchState

N = 6
SAME = dict(rtol=1e-5, atol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _rm(window=9, n_layers=2, use_position=True, seed=0, d_model=16, n_latents=N):
    torch.manual_seed(seed)
    cfg = RewardConfig(
        d_model=d_model, n_layers=n_layers, n_heads=2, window=window, dropout=0.0, use_position=use_position
    )
    rm = RewardModel(n_latents, cfg)
    with torch.no_grad():  # non-trivial standardisation, larger weights: the layers matter
        rm.z_mean.normal_(0, 0.5)
        rm.z_std.uniform_(0.5, 2.0)
        for p in rm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return rm.eval()


def _incremental(rm, z, valid, pos):
    """Logits [B, T] from one score_next call per position."""
    cache = rm.new_cache(z.shape[0])
    return torch.stack([rm.score_next(z[:, t], cache, pos[:, t], valid[:, t]) for t in range(z.shape[1])], 1)


@pytest.mark.parametrize("n_layers,window", [(1, 5), (2, 9), (2, 16), (3, 10)])
@pytest.mark.parametrize("use_position", [True, False])
def test_incremental_scores_equal_full_forward_on_sequences_longer_than_the_window(
    n_layers, window, use_position
):
    rm = _rm(window, n_layers, use_position)
    B, T = 4, 4 * window + 3
    torch.manual_seed(1)
    z = torch.randn(B, T, N) * 2
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :3] = False  # rows that start at different steps (left padding)
    valid[2, : window + 1] = False
    valid[3, window + 2 : window + 5] = False  # a gap in the middle (columns still count for the window)
    pos = (valid.long().cumsum(1) - 1).clamp_min(0) + torch.tensor([0, 5, 0, 17])[:, None]
    got = _incremental(rm, z, valid, pos)
    with torch.no_grad():
        want = rm(z, valid, pos)
    torch.testing.assert_close(got, want, **SAME)  # every column, padding columns included
    # the full-window scorer the hook used: the last `window` columns, newest valid
    with torch.no_grad():
        for t in range(window, T):
            cols = slice(t - window + 1, t + 1)
            ok = valid[:, t]
            last = rm.score_last(z[ok, cols], valid[ok, cols], pos[ok, cols])
            torch.testing.assert_close(got[ok, t], last, **SAME)


def test_incremental_scores_equal_training_time_scores():
    rm = _rm(window=12, n_layers=2)
    torch.manual_seed(2)
    traces = [torch.randn(L, N) for L in (40, 13, 29)]
    want = score_traces(rm, traces)
    for tr, w in zip(traces, want, strict=True):
        got = _incremental(
            rm, tr[None], torch.ones(1, len(tr), dtype=torch.bool), torch.arange(len(tr))[None]
        )
        torch.testing.assert_close(got[0], w, **SAME)


def test_score_step_gradient_equals_full_window_gradient_and_leaves_the_cache():
    rm = _rm(window=9, n_layers=2)
    torch.manual_seed(3)
    B, T = 3, 30
    z = torch.randn(B, T, N)
    ones = torch.ones(B, T, dtype=torch.bool)
    pos = torch.arange(T).expand(B, T)
    cache = rm.new_cache(B)
    for t in range(T - 1):
        rm.score_next(z[:, t], cache, pos[:, t])
    k, v, n = cache.k.clone(), cache.v.clone(), cache.n
    zt = z[:, -1].clone().requires_grad_(True)
    logit, kv = rm.score_step(zt, cache, pos[:, -1])
    (g_inc,) = torch.autograd.grad(logit.sum(), zt)
    assert torch.equal(cache.k, k) and torch.equal(cache.v, v) and cache.n == n  # not advanced
    hist = z[:, -9:].clone().requires_grad_(True)
    full = rm.score_last(hist, ones[:, -9:], pos[:, -9:])
    (g_full,) = torch.autograd.grad(full.sum(), hist)
    torch.testing.assert_close(logit, full, **SAME)
    torch.testing.assert_close(g_inc, g_full[:, -1], **SAME)
    assert (
        g_full[:, :-1].abs().sum() > 0
    )  # older latents matter to the score, but not to the gradient we need


def test_score_step_is_refused_for_other_kinds_and_in_training_mode():
    from lrs.errors import LRSError

    rm = _rm()
    cache = rm.new_cache(1)
    rm.train()
    with pytest.raises(LRSError, match="eval"):
        rm.score_step(torch.randn(1, N), cache, torch.zeros(1, dtype=torch.long))
    mlp = RewardModel(N, RewardConfig(kind="mlp", d_model=8, n_heads=2)).eval()
    assert not mlp.incremental
    with pytest.raises(LRSError, match="causal"):
        mlp.new_cache(1)


def test_ring_history_reads_like_the_rolled_history():
    s = _BatchState(2, 5, 3, torch.device("cpu"))
    z, valid, pos = (
        torch.zeros(2, 5, 3),
        torch.zeros(2, 5, dtype=torch.bool),
        torch.zeros(2, 5, dtype=torch.long),
    )
    torch.manual_seed(4)
    for t in range(13):
        x = torch.randn(2, 3)
        s.push(x, t)
        z, valid, pos = (torch.roll(a, -1, dims=1) for a in (z, valid, pos))
        z[:, -1], valid[:, -1], pos[:, -1] = x, True, t
        assert torch.equal(s.z, z) and torch.equal(s.valid, valid) and torch.equal(s.pos, pos)
        assert torch.equal(s.newest(), x)
    s.set_newest(torch.tensor([1]), torch.ones(1, 3))
    assert torch.equal(s.z[1, -1], torch.ones(3)) and torch.equal(s.z[0, -1], x[0])


def _states(st, rm, pushes, batch=4, window=None, commit_last=True):
    """The same latent pushes into a cached state (through the steerer's own helpers, in the hook's order:
    push, score, [steer,] commit) and a plain one."""
    window = window or rm.cfg.window
    inc = _BatchState(batch, window, N, torch.device("cpu"), rm)
    full = _BatchState(batch, window, N, torch.device("cpu"))
    for t, z in enumerate(pushes):
        for s in (inc, full):
            s.push(z, t)
        logit = st._score(inc)
        torch.testing.assert_close(logit, st._score(full), **SAME)
        if commit_last or t < len(pushes) - 1:
            st._commit(inc)
    return inc, full


@pytest.mark.parametrize("control", ["reward", "random"])
def test_delta_through_the_cache_equals_the_full_window_delta(control):
    rm = _rm(window=9, n_layers=2)
    ident = IdentityEncoder(N, normalize=False, rescale=False, layer=1)
    torch.manual_seed(5)
    pushes = [torch.randn(4, N) for _ in range(23)]
    a = LatentRewardSteerer(ident, rm, SteerConfig(k=3, alpha=0.4, gate="always", control=control))
    b = LatentRewardSteerer(ident, rm, SteerConfig(k=3, alpha=0.4, gate="always", control=control))
    inc, full = _states(a, rm, pushes, window=12, commit_last=False)  # history longer than the window
    for rows in (torch.arange(4), torch.tensor([0, 2]), torch.tensor([3])):
        h = inc.newest(rows).clone()
        d_inc, ok_inc = a._delta(inc, rows, h)
        d_full, ok_full = b._delta(full, rows, h)
        assert ok_inc.all() and ok_full.all()
        torch.testing.assert_close(d_inc, d_full, **SAME)
        assert d_inc.norm(dim=-1).min() > 0


def test_commit_of_steered_rows_uses_the_steered_latent():
    rm = _rm(window=9, n_layers=2)
    ident = IdentityEncoder(N, normalize=False, rescale=False, layer=1)
    st = LatentRewardSteerer(ident, rm, SteerConfig(gate="always"))
    torch.manual_seed(6)
    pushes = [torch.randn(4, N) for _ in range(15)]
    inc, full = _states(st, rm, pushes[:-1])
    for s in (inc, full):
        s.push(pushes[-1], len(pushes) - 1)
    st._score(inc)
    rows = torch.tensor([1, 3])
    steered = torch.randn(2, N)
    for s in (inc, full):
        s.set_newest(rows, steered)
    st._commit(inc, rows)
    nxt = torch.randn(4, N)
    for s in (inc, full):
        s.push(nxt, len(pushes))
    torch.testing.assert_close(st._score(inc), st._score(full), **SAME)


def _setup(kind="causal"):
    model, tok = make_model("llama"), make_tokenizer()
    torch.manual_seed(1)
    enc = TopKSAE(32, n_latents=N, k=3, layer=1)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.3)
    rm = _rm(window=8, n_layers=2)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ["What is 2+3?", "hi", "a much longer question about numbers and apples"]
    ]
    return model, tok, enc, rm, prompts


@pytest.mark.parametrize("gate", ["gated", "always"])
def test_steered_generation_is_the_same_through_the_cache_and_the_full_window(monkeypatch, gate):
    model, tok, enc, rm, prompts = _setup()
    cfg = SteerConfig(k=2, alpha=1.5, tau_r=0.6, tau_c=0.0, gate=gate, warmup=2, every=2)
    runs = []
    for incremental in (True, False):
        spy = Spy(enc)
        st = LatentRewardSteerer(spy, rm, cfg, log_events=True)
        if not incremental:
            monkeypatch.setattr(st, "_incremental_reward", lambda: None)
        out = generate(
            model, tok, prompts, max_new_tokens=24, batch_size=3, progress=False, context=st.context
        )
        runs.append((out, spy.deltas, st.row_stats()))
    (out_i, d_i, rows_i), (out_f, d_f, rows_f) = runs
    assert [g.token_ids for g in out_i] == [g.token_ids for g in out_f]
    assert len(d_i) == len(d_f) > 0
    for a, b in zip(d_i, d_f, strict=True):
        torch.testing.assert_close(a, b, **SAME)
    for row in rows_i:
        ev_i, ev_f = rows_i[row].pop("events"), rows_f[row].pop("events")
        assert [e["steered"] for e in ev_i] == [e["steered"] for e in ev_f]
        assert [e["r"] for e in ev_i] == pytest.approx([e["r"] for e in ev_f], abs=2e-4)
        assert rows_i[row] == pytest.approx(rows_f[row], rel=1e-5)
    assert sum(r["steers"] for r in rows_i.values()) > 0


def test_the_steerer_takes_the_incremental_path_only_where_scores_stay_equal():
    model, tok, enc, rm, prompts = _setup()
    assert LatentRewardSteerer(enc, rm, SteerConfig())._incremental_reward() is rm
    assert LatentRewardSteerer(enc, rm, SteerConfig(window=20))._incremental_reward() is rm
    assert (
        LatentRewardSteerer(enc, rm, SteerConfig(window=5))._incremental_reward() is None
    )  # shorter history
    mlp = RewardModel(N, RewardConfig(kind="mlp", d_model=8, n_heads=2))
    assert LatentRewardSteerer(enc, mlp, SteerConfig())._incremental_reward() is None


def test_a_decode_step_reads_no_scalar_back_from_the_device():
    """No .item()/float()/bool() on a tensor inside the hook's decode steps (each is a device sync)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    model, tok, enc, rm, prompts = _setup()
    st = LatentRewardSteerer(enc, rm, SteerConfig(gate="gated", tau_r=0.6, tau_c=0.0, warmup=1, every=2))
    original = st._step
    steps = []

    def counted(output, tracker, state, indices):
        if tracker.step == 0:
            return original(output, tracker, state, indices)
        with Count():
            out = original(output, tracker, state, indices)
        steps.append(out is not None)
        return out

    st._step = counted
    generate(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False, context=st.context)
    assert any(steps) and len(steps) == 11
    assert Count.n == 0
