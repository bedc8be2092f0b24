"""Batched generation: order restored, batch-invariant greedy output, per-step tracker, stop handling."""

import pytest
import torch
from conftest import ForceToken, make_model, make_tokenizer

import lrs.generation
from lrs.errors import LRSError
from lrs.generation import (
    DecodeTracker,
    eos_ids,
    generate,
    layer_output,
    past_length,
    replace_layer_output,
)

PROMPTS = ["short", "a somewhat longer prompt", "x", "the longest prompt of them all, by some margin"]


def test_batched_greedy_equals_batch_one_in_input_order():
    model, tok = make_model("llama"), make_tokenizer()
    big = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    for p, g in zip(PROMPTS, big, strict=True):
        (one,) = generate(model, tok, [p], max_new_tokens=8, batch_size=1, progress=False)
        assert one.token_ids == g.token_ids and one.text == g.text
    assert all(g.n_tokens == 8 and not g.finished and len(g.conf) == 8 for g in big)


def test_confidence_is_the_top_probability_of_each_step():
    model, tok = make_model("qwen2"), make_tokenizer()
    (g,) = generate(model, tok, ["hello"], max_new_tokens=4, batch_size=1, progress=False)
    ids = tok("hello", return_tensors="pt").input_ids
    full = torch.cat([ids, torch.tensor([g.token_ids[:-1]])], dim=1)
    with torch.no_grad():
        probs = model(full).logits[0, ids.shape[1] - 1 :].softmax(-1)
    torch.testing.assert_close(torch.tensor(g.conf), probs.amax(-1), rtol=1e-4, atol=1e-5)
    assert g.token_ids == probs.argmax(-1).tolist()


def test_stop_token_ends_a_row_and_tracker_marks_it_dead():
    model, tok = make_model("llama"), make_tokenizer()
    first = generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False)
    stop = next(
        t
        for j, t in enumerate(first[0].token_ids[1:5], 1)
        if t not in first[1].token_ids and t not in first[0].token_ids[:j]
    )  # row 0 only
    model.generation_config.eos_token_id = [stop]
    out = generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False)
    k = first[0].token_ids.index(stop)
    assert out[0].finished and out[0].token_ids == first[0].token_ids[: k + 1]
    assert stop in eos_ids(model, tok)
    seen = []
    tracker = DecodeTracker(model, [stop])
    with tracker.attach():
        hook = model.model.layers[0].register_forward_hook(lambda m, a, o: seen.append(tracker.live.clone()))
        enc = tok(PROMPTS[:2], return_tensors="pt", padding=True)
        model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=[stop], pad_token_id=256)
        hook.remove()
    assert seen[0].all() and not seen[k + 1][0]  # row 0 dead from the call after its stop token


def test_layer_output_helpers_handle_tuple_and_tensor():
    h = torch.ones(1, 2, 3)
    assert layer_output(h) is h and layer_output((h, "cache")) is h
    assert replace_layer_output((h, "cache"), h * 2)[1] == "cache"
    assert torch.equal(replace_layer_output(h, h * 2), h * 2)


def test_sampling_is_seeded_per_batch():
    model, tok = make_model("qwen2"), make_tokenizer()
    a = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, temperature=1.0, seed=5, progress=False)
    b = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, temperature=1.0, seed=5, progress=False)
    c = generate(model, tok, PROMPTS, max_new_tokens=6, batch_size=2, temperature=1.0, seed=6, progress=False)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] != [g.token_ids for g in c]


# ---- prefill vs decode: past_length and DecodeTracker.verify -------------------------------------------------


class FakeCache:
    """Any object with ``get_seq_length`` is a KV cache, whatever keyword the model's forward receives it under."""

    def __init__(self, n: int):
        self.n = n

    def get_seq_length(self) -> int:
        return self.n


def test_past_length_reads_a_cache_under_any_keyword():
    ids = torch.ones(2, 1, dtype=torch.long)
    assert past_length(ids, {"kv_state_v9": FakeCache(5)}) == 5
    assert past_length(ids, {"use_cache": True, "kv_state_v9": FakeCache(5), "logits_to_keep": 1}) == 5
    # the cache is believed over a mask that would say something else
    assert past_length(ids, {"attention_mask": torch.ones(2, 40), "cache": FakeCache(5)}) == 5
    # a prefill: an empty cache, whatever the input width
    assert past_length(torch.ones(2, 9, dtype=torch.long), {"cache": FakeCache(0)}) == 0


def test_past_length_reads_the_real_cache_of_the_installed_transformers():
    model = make_model("qwen2")
    with torch.no_grad():
        out = model(torch.ones(2, 7, dtype=torch.long), use_cache=True)
    # `cache` (5.24+), `past_key_values` (earlier); a legacy tuple in 4.x when no cache object was passed
    cache = out.get("cache", None) or out.get("past_key_values")
    ids = torch.ones(2, 1, dtype=torch.long)
    for name in ("cache", "past_key_values", "kv_state_v9"):
        assert past_length(ids, {name: cache, "attention_mask": torch.ones(2, 8)}) == 7


def test_past_length_reads_a_legacy_tuple_under_past_key_values():
    k = torch.zeros(3, 2, 7, 16)  # [batch, kv heads, positions, head dim]
    legacy = ((k, k.clone()), (k.clone(), k.clone()))
    ids = torch.ones(3, 1, dtype=torch.long)
    assert past_length(ids, {"past_key_values": legacy}) == 7
    assert past_length(ids, {"past_key_values": legacy, "attention_mask": torch.ones(3, 30)}) == 7
    # an unreadable legacy value falls through to the attention mask
    assert past_length(ids, {"past_key_values": (), "attention_mask": torch.ones(3, 4)}) == 3


def test_past_length_falls_back_to_the_attention_mask_width():
    mask = torch.ones(2, 12, dtype=torch.long)
    assert past_length(torch.ones(2, 1, dtype=torch.long), {"attention_mask": mask}) == 11
    assert past_length(torch.ones(2, 12, dtype=torch.long), {"attention_mask": mask}) == 0  # prefill
    assert past_length(torch.ones(2, 1, dtype=torch.long), {"cache": None, "attention_mask": mask}) == 11


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"cache": None, "past_key_values": None, "attention_mask": None},
        {"attention_mask": torch.ones(2, 1, 1, 12)},  # a 4-d mask does not tell the past length
        {"kv_state_v9": object()},  # not a cache
    ],
    ids=["nothing", "all-none", "4d-mask", "not-a-cache"],
)
def test_past_length_without_cache_or_mask_is_a_one_line_error(kwargs):
    with pytest.raises(LRSError, match="cannot tell prefill from decode") as e:
        past_length(torch.ones(2, 1, dtype=torch.long), kwargs)
    assert "\n" not in str(e.value)


def test_a_tracker_that_misses_every_decode_step_fails_loudly(monkeypatch):
    """The transformers 5.24 failure mode: every forward call looked like a prefill, so nothing was steered."""
    model, tok = make_model("qwen2"), make_tokenizer()
    monkeypatch.setattr(lrs.generation, "past_length", lambda ids, kwargs: 0)
    with pytest.raises(LRSError, match="decode steps") as e:
        generate(model, tok, PROMPTS[:2], max_new_tokens=6, batch_size=2, progress=False)
    assert "\n" not in str(e.value)


def test_verify_accepts_exactly_one_decode_step_per_token_after_the_first():
    tracker = DecodeTracker(make_model("qwen2"), [258])
    tracker.step = 5
    tracker.verify(6)
    tracker.verify(1)  # one token: only a prefill, nothing to check
    for n in (5, 7, 2):
        with pytest.raises(LRSError, match="decode steps"):
            tracker.verify(n)


def test_one_confidence_per_generated_token_for_every_row():
    model, tok = make_model("llama"), make_tokenizer()
    first = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    stop, row = next(  # a token one row emits early and no other row emits
        (t, i)
        for i, g in enumerate(first)
        for j, t in enumerate(g.token_ids[1:6], 1)
        if t not in g.token_ids[:j] and all(t not in h.token_ids for h in first if h is not g)
    )
    model.generation_config.eos_token_id = [stop, 258]
    out = generate(model, tok, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    assert out[row].finished and out[row].n_tokens < 8
    assert any(g.n_tokens == 8 for g in out)
    for g, f in zip(out, first, strict=True):
        assert len(g.conf) == g.n_tokens
        assert all(0.0 < c <= 1.0 for c in g.conf)
        assert g.conf == pytest.approx(f.conf[: g.n_tokens], abs=1e-6)  # the same steps as without the stop


def test_tracker_sees_one_decode_step_per_generated_token_on_installed_transformers():
    model, tok = make_model("qwen2"), make_tokenizer()
    tracker = DecodeTracker(model, eos_ids(model, tok))
    steps = []
    with tracker.attach():
        hook = model.model.layers[0].register_forward_hook(lambda m, a, o: steps.append(tracker.step))
        for prompts, n_new in ((PROMPTS[:3], 7), (PROMPTS[3:], 4)):  # the tracker resets between calls
            steps.clear()
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(
                    **enc,
                    max_new_tokens=n_new,
                    do_sample=False,
                    pad_token_id=256,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            assert out.sequences.shape[1] - enc["input_ids"].shape[1] == n_new
            assert tracker.step == n_new - 1 and tracker.prompt_len == enc["input_ids"].shape[1]
            assert steps == list(range(n_new))
            tracker.verify(n_new)
            # one confidence per call: the top probability of the logits generate used for that token
            assert len(tracker.confs) == n_new
            for conf, logits in zip(tracker.confs, out.logits, strict=True):
                torch.testing.assert_close(conf, logits.float().softmax(-1).amax(-1))
        hook.remove()


def test_tracker_marks_a_forced_stop_dead_from_the_next_step():
    model, tok = make_model("qwen2"), make_tokenizer()
    tracker = DecodeTracker(model, [258])
    enc = tok(PROMPTS[:3], return_tensors="pt", padding=True, add_special_tokens=False)
    live = []
    with tracker.attach():
        hook = model.model.layers[0].register_forward_hook(lambda m, a, o: live.append(tracker.live.tolist()))
        with torch.no_grad():
            model.generate(
                **enc,
                max_new_tokens=8,
                do_sample=False,
                pad_token_id=256,
                eos_token_id=[258],
                logits_processor=[ForceToken(enc["input_ids"].shape[1], row=1, at=2, token=258)],
            )
        hook.remove()
    assert tracker.step == 7
    assert [row[1] for row in live] == [True, True, True] + [False] * 5  # token 2 is the stop: dead at call 3
    assert all(row[0] and row[2] for row in live)
