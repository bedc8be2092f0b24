"""--method lora: a PEFT LoRA adapter folder evaluated in the same harness as the steering methods."""

import json

import pytest
import torch
from conftest import build_trained_run, make_model, make_tokenizer

from lrs.cli import main
from lrs.errors import LRSError
from lrs.steering.adapter import LoraAdapter

peft = pytest.importorskip("peft")


def save_random_adapter(model, path, scale=0.5):
    """A LoRA adapter with non-zero B (a trained adapter's shape), saved the way lrs train-vectors saves it."""
    cfg = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0
    )
    pm = peft.get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * scale
    pm.save_pretrained(str(path))
    return pm


def greedy(model, tok, n=8):
    ids = tok(["Tom has 3 apples.", "2+2="], return_tensors="pt", padding=True)
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, ids["input_ids"].shape[1] :]


def test_adapter_changes_generation_exactly_like_peft_and_leaves_the_model_unchanged(tmp_path):
    tok = make_tokenizer()
    tok.padding_side = "left"
    pm = save_random_adapter(make_model(), tmp_path / "adapter")
    with torch.no_grad():
        want = greedy(pm, tok)
    model = make_model()
    base = greedy(model, tok)
    assert not torch.equal(want, base)  # the adapter matters
    st = LoraAdapter(tmp_path / "adapter")
    with st.apply(model, tok):
        got = greedy(model, tok)
        got_again = greedy(model, tok)
    assert torch.equal(got, want) and torch.equal(got_again, want)
    assert st.stats()["adapter_hash"] == st.hash[:12]
    assert torch.equal(greedy(model, tok), base)  # outside apply(): the plain model again
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert st.fingerprint()["adapter"] == LoraAdapter(tmp_path / "adapter").fingerprint()["adapter"]


def test_eval_method_lora_runs_in_the_harness_and_bad_folders_are_one_line(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run = build_trained_run(tmp_path, limit=12, tokens=24, layers="-1")
    save_random_adapter(AutoModelForCausalLM.from_pretrained(run["model"]), tmp_path / "adapter")
    ev = ["eval", *run["common"], "--limit", "3", "--max-new-tokens", "8", "--method"]
    assert main([*ev, "base"]) == 0 and main([*ev, "lora", "--adapter", str(tmp_path / "adapter")]) == 0
    d = run["run"] / "eval" / "arith" / "test"
    base = [json.loads(x) for x in (d / "base.jsonl").read_text().splitlines()]
    lora = [json.loads(x) for x in (d / "lora.jsonl").read_text().splitlines()]
    assert [r["output"] for r in base] != [r["output"] for r in lora]
    s = json.loads((d / "lora.summary.json").read_text())
    assert s["key_parts"]["steerer"]["kind"] == "lora" and len(s["key_parts"]["steerer"]["adapter"]) == 64
    capsys.readouterr()
    assert main([*ev, "lora"]) == 2
    assert "--method lora needs --adapter DIR" in capsys.readouterr().err
    assert main([*ev, "lora", "--adapter", str(tmp_path)]) == 2
    assert "not a PEFT adapter folder (missing adapter_config.json" in capsys.readouterr().err
    with pytest.raises(LRSError, match="not a PEFT adapter folder"):
        LoraAdapter(tmp_path / "nowhere")
