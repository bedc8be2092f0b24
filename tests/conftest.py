"""Shared offline fixtures: a byte-level tokenizer with a chat template and tiny random Llama/Qwen2 models."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

torch.set_num_threads(1)  # tiny models gain nothing from threads; avoids stalls on a busy 2-core box

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token byte-level tokenizer (256 bytes + 3 specials) built in-process: no files, no network."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_input_names=[
            "input_ids",
            "attention_mask",
        ],  # no token_type_ids: generate() in 4.x refuses them
    )
    return tok


def make_model(arch: str = "qwen2", *, layers: int = 2, hidden: int = 32, seed: int = 0, vocab: int = 259):
    """A tiny random decoder-only model (fp32, eval mode) of the given family."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=SPECIALS.index("<|im_end|>") + 256,
        pad_token_id=256,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(arch)
    model.generation_config.pad_token_id = 256
    model.generation_config.eos_token_id = common["eos_token_id"]
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-matrix tests (OpenMP spin-waits stall a shared 2-core box),
    restored afterwards: some CLI tests set the thread count themselves. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(params=["qwen2", "llama"])
def tiny_model(request):
    return make_model(request.param)


def build_trained_run(root, *, limit: int = 24, tokens: int = 40, layers: str = "1") -> dict:
    """A run directory trained through the CLI on a tiny saved model: traces, identity encoder, reward model.

    The random model is never right, so every other trace is labelled correct (stage 2 needs two classes).
    """
    import lrs.traces
    from lrs.cli import main
    from lrs.grading import Grade

    model_dir = root / "tiny"
    make_model("qwen2", hidden=32).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    mp = pytest.MonkeyPatch()
    mp.setattr(
        lrs.traces,
        "grade",
        lambda outs, golds: [Grade("1", i % 2 == 0, "numeric", False) for i in range(len(outs))],
    )
    common = ["--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--run", str(root / "run")]
    try:
        argv = [
            "collect",
            *common,
            "--limit",
            str(limit),
            "--max-new-tokens",
            str(tokens),
            "--layers",
            layers,
        ]
        assert main(argv) == 0
        assert main(["fit-encoder", *common, "--kind", "identity", "--layer", layers]) == 0
        assert main(["train-reward", *common, "--epochs", "1"]) == 0
    finally:
        mp.undo()
    return dict(root=root, common=common, run=root / "run", model=str(model_dir))


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


class ForceToken:
    """Logits processor: row ``row`` emits ``token`` as its generated token number ``at`` (0-based)."""

    def __init__(self, prompt_len: int, row: int, at: int, token: int):
        self.prompt_len, self.row, self.at, self.token = prompt_len, row, at, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.prompt_len + self.at:
            scores = scores.clone()
            scores[self.row] = float("-inf")
            scores[self.row, self.token] = 0.0
        return scores
