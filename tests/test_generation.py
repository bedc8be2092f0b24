"""Batched generation: order restored, batch-invariant greedy output, per-step tracker, stop handling."""

import torch
from conftest import make_model, make_tokenizer

from lrs.generation import DecodeTracker, eos_ids, generate, layer_output, replace_layer_output

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
