"""Adapters for pretrained SAEs: SAELens, EleutherAI sparsify and the LRS / thinking-llms `.pt` dict."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrs.encoders.base import (
    _as_input,
    _finish,
)
from lrs.encoders.topk import TopKSAE
from lrs.errors import LRSError

#: Hook names whose activations are the output of decoder block L, i.e. what ``layer=L`` steers.
#: TransformerLens (SAELens): ``blocks.L.hook_resid_post`` is block L's output and ``blocks.L.hook_resid_pre``
#: its input, i.e. block L-1's output (L=0 is the embeddings: no block output). Hugging Face module names
#: (SAELens on HF models, sparsify): ``model.layers.L`` / ``layers.L`` / ``transformer.h.L`` /
#: ``gpt_neox.layers.L`` are block L's output. In HF ``hidden_states`` indices block L's output is
#: ``hidden_states[L + 1]`` (``hidden_states[0]`` is the embeddings) except for the last block, whose
#: ``hidden_states`` entry is taken after the final norm; lrs hooks the block itself, as TransformerLens does.
_RESID_POST = re.compile(r"blocks\.(\d+)\.hook_resid_post")
_RESID_PRE = re.compile(r"blocks\.(\d+)\.hook_resid_pre")
_HF_BLOCK = re.compile(r"(?:(?:model|transformer|gpt_neox)\.)?(?:layers|h)\.(\d+)")


def resid_layer(hook: str | None) -> int | None:
    """The block whose output hook ``hook`` reads (``layer=L`` in lrs), or None if it reads anything else.

    ``blocks.L.hook_resid_post`` and HF ``model.layers.L`` give L; ``blocks.L.hook_resid_pre`` gives L-1
    (None for L=0, the embeddings); MLP/attention outputs, ``hook_resid_mid`` and unknown names give None.
    """
    hook = hook or ""
    if m := _RESID_POST.fullmatch(hook):
        return int(m.group(1))
    if (m := _RESID_PRE.fullmatch(hook)) and int(m.group(1)) > 0:
        return int(m.group(1)) - 1
    if m := _HF_BLOCK.fullmatch(hook):
        return int(m.group(1))
    return None


def _layer_from_hook(hook: str | None, layer: int | None, what: str) -> int | None:
    """Block index whose output a hook name reads (HF convention: output of block L), or the given layer."""
    if layer is not None:
        return layer
    found = resid_layer(hook)
    if found is None:
        raise LRSError(
            f"cannot tell which block output {what} hook {hook!r} reads: pass layer=L (output of block L)"
        )
    return found


class SAELensEncoder(nn.Module):
    """A SAELens `SAE`: encode is the SAE's own encode (faithful activation and normalisation)."""

    kind = "saelens"

    def __init__(self, sae: nn.Module, *, layer: int | None, source: dict | None = None):
        super().__init__()
        self.sae = sae
        self.d_model, self.n_latents = int(sae.cfg.d_in), int(sae.cfg.d_sae)
        self.layer, self.source, self.metrics = layer, source or {}, {}

    @property
    def _ref(self) -> Tensor:
        return self.sae.W_dec

    def encode(self, h: Tensor) -> Tensor:
        x = _as_input(h, self.d_model, self._ref).to(self._ref.dtype)
        return self.sae.encode(x).float()

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        """The SAE's decode(z_new) − decode(z_old), in float32 before casting to h's dtype."""
        dec = self.sae.decode
        delta = dec(z_new.to(self._ref)).float() - dec(z_old.to(self._ref)).float()
        return _finish(delta, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        c |= {"hook_name": _saelens_hook(self.sae), **self.source}
        to_dict = getattr(self.sae.cfg, "to_dict", None)
        if callable(to_dict):  # the SAE's own config: enough to rebuild it from the tensors (from_saved)
            c["saelens_cfg"] = to_dict()
        return c

    def tensors(self) -> dict[str, Tensor]:
        """Every parameter and buffer of the SAE (float32 copies): JumpReLU thresholds and gated SAEs'
        gates are part of what it computes, so they are part of its hash."""
        state = self.sae.state_dict()
        return {
            n: (t.detach().float() if t.is_floating_point() else t.detach()).cpu().contiguous()
            for n, t in state.items()
        }

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> SAELensEncoder:
        """Rebuild the SAE from a saved artefact alone (its ``saelens_cfg`` and tensors; needs sae_lens).

        :func:`lrs.encoders.load_encoder` reloads SAELens artefacts by release and id instead; this is the
        by-value path for artefacts whose source is gone."""
        cfg = config.get("saelens_cfg")
        if not isinstance(cfg, dict):
            raise LRSError("this SAELens encoder artefact does not hold the SAE's config: import it again")
        try:
            from sae_lens import SAE
        except ImportError:
            raise LRSError("SAELens adapter needs `pip install lrs[saelens]`") from None
        sae = SAE.from_dict({**cfg, "device": "cpu"})
        sae.load_state_dict(tensors)
        source = {k: config[k] for k in ("release", "sae_id") if k in config}
        return check_saelens(cls(sae.eval(), layer=config.get("layer"), source=source))


def _saelens_hook(sae: Any) -> str | None:
    cfg = sae.cfg
    hook = getattr(cfg, "hook_name", None)
    meta = getattr(cfg, "metadata", None)
    if hook is None and meta is not None:
        hook = meta.get("hook_name") if isinstance(meta, dict) else getattr(meta, "hook_name", None)
    return hook


def check_saelens(enc: SAELensEncoder) -> SAELensEncoder:
    """Refuse SAEs whose ``decode(z_new) - decode(z_old)`` is not a hidden-state change lrs can add.

    Transcoders predict another module's output; ``layer_norm`` / ``constant_norm_rescale`` normalisation
    rescales the output by statistics of the input the decoder does not see; attention ``hook_z`` SAEs read
    per-head values, not the residual stream."""
    cfg = enc.sae.cfg
    arch = cfg.architecture() if callable(getattr(cfg, "architecture", None)) else ""
    norm = getattr(cfg, "normalize_activations", "none")
    if "transcoder" in str(arch).lower():
        raise LRSError(f"this SAELens SAE is a {arch} (predicts another module's output), not an autoencoder")
    if norm in ("layer_norm", "constant_norm_rescale"):
        raise LRSError(
            f"SAELens SAEs with normalize_activations={norm!r} decode relative to each input's own norm: "
            "lrs cannot turn a latent change into a hidden-state change with them"
        )
    if getattr(cfg, "reshape_activations", "none") == "hook_z":
        raise LRSError("this SAELens SAE reads attention heads (hook_z), not the residual stream")
    return enc


def from_saelens(
    sae_or_release: Any, sae_id: str | None = None, *, layer: int | None = None, device: str = "cpu"
) -> SAELensEncoder:
    """Wrap a SAELens SAE object, load a local SAELens folder (``SAE.save_model`` output: ``cfg.json`` +
    ``sae_weights.safetensors``) or `SAE.from_pretrained(release, sae_id)` (needs `lrs[saelens]`).

    A folder is recorded by its absolute path (``release``; ``sae_id`` None), a release by name and id:
    :func:`lrs.encoders.load_encoder` reloads the SAE from there.
    """
    source = None
    if isinstance(sae_or_release, str | Path):
        local = Path(sae_or_release)
        folder = local.is_dir() and (local / "cfg.json").is_file()
        if sae_id is None and not folder:
            raise LRSError(
                "from_saelens(release, sae_id): give the SAE id inside the release too "
                f"(or a SAELens folder with cfg.json; {str(local)!r} is not one)"
            )
        try:
            from sae_lens import SAE
        except ImportError:
            raise LRSError("SAELens adapter needs `pip install lrs[saelens]`") from None
        try:
            if folder:
                out = SAE.load_from_disk(str(local.resolve()), device=device)
            else:
                out = SAE.from_pretrained(str(sae_or_release), sae_id, device=device)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LRSError(f"SAELens could not load {str(sae_or_release)!r} / {sae_id!r}: {first}") from None
        sae = out[0] if isinstance(out, tuple) else out  # sae_lens < 6 returned (sae, cfg_dict, sparsity)
        if folder:
            source = {"release": str(local.resolve()), "sae_id": None}
        else:
            source = {"release": str(sae_or_release), "sae_id": sae_id}
    else:
        sae = sae_or_release
    missing = [a for a in ("W_enc", "W_dec", "b_dec", "cfg", "encode", "decode") if not hasattr(sae, a)]
    if missing:
        raise LRSError(
            f"{type(sae).__name__} does not look like a SAELens SAE (missing {', '.join(missing)})"
        )
    enc = SAELensEncoder(sae, layer=_layer_from_hook(_saelens_hook(sae), layer, "SAELens"), source=source)
    return check_saelens(enc)


class SparsifyEncoder(nn.Module):
    """An EleutherAI sparsify SparseCoder, copied to float32 tensors (no library needed after construction).

    `encode` returns the dense pre-activation (x − b_dec) Wᵀ + b for all n latents: a top-k code is zero and
    has zero gradient off its support and changes support discontinuously, so gradient ascent in z could only
    rescale the k latents already active. This matches the dense code used for our own TopK SAE at use time.
    `encode(h, sparse=True)` gives the coder's own top-k code scattered into n dims.
    """

    kind = "sparsify"

    def __init__(
        self, d_model: int, n_latents: int, k: int, *, activation: str = "topk", layer: int | None = None
    ):
        super().__init__()
        self.d_model, self.n_latents, self.k, self.activation = d_model, n_latents, k, activation
        self.layer, self.source, self.metrics = layer, {}, {}
        self.register_buffer("W_enc", torch.zeros(n_latents, d_model))
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.register_buffer("W_dec", torch.zeros(n_latents, d_model))
        self.register_buffer("b_dec", torch.zeros(d_model))

    def encode(self, h: Tensor, sparse: bool = False) -> Tensor:
        pre = (_as_input(h, self.d_model, self.W_enc) - self.b_dec) @ self.W_enc.T + self.b_enc
        if not sparse:
            return pre
        acts = F.relu(pre)
        if self.activation == "groupmax":
            vals, idx = acts.unflatten(-1, (self.k, -1)).max(-1)
            idx = idx + torch.arange(0, self.n_latents, self.n_latents // self.k, device=idx.device)
        else:
            vals, idx = acts.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor:
        return _finish((z_new - z_old).to(self.W_dec) @ self.W_dec, h)

    def config(self) -> dict:
        c = {"kind": self.kind, "layer": self.layer, "d_model": self.d_model, "n_latents": self.n_latents}
        return c | {"k": self.k, "activation": self.activation, **self.source}

    def tensors(self) -> dict[str, Tensor]:
        return {n: t.detach().cpu().contiguous() for n, t in self.named_buffers()}

    @classmethod
    def from_saved(cls, config: dict, tensors: dict[str, Tensor]) -> SparsifyEncoder:
        enc = cls(
            config["d_model"],
            config["n_latents"],
            config["k"],
            activation=config["activation"],
            layer=config["layer"],
        )
        enc.load_state_dict(tensors)
        enc.source = {key: config[key] for key in ("name", "hookpoint") if key in config}
        return enc


def from_sparsify(
    coder_or_name: Any, hookpoint: str | None = None, *, layer: int | None = None, device: str = "cpu"
) -> SparsifyEncoder:
    """Wrap a sparsify SparseCoder, or load one by hub name / local dir + hookpoint (needs `lrs[sparsify]`).

    A local path may be the checkpoint folder (one sub-folder per hookpoint, ``hookpoint`` names it) or a
    hookpoint folder itself (``cfg.json`` + ``sae.safetensors``; its name is the hookpoint). A skip connection
    (``W_skip``) does not depend on the latents, so it drops out of ``decode_delta`` and is not copied.
    """
    source = {}
    if isinstance(coder_or_name, str | Path):
        try:
            from sparsify import SparseCoder
        except ImportError:
            raise LRSError("sparsify adapter needs `pip install lrs[sparsify]`") from None
        local = Path(coder_or_name)
        if hookpoint is None and (local / "cfg.json").is_file():
            hookpoint = local.name  # a hookpoint folder (sparsify saves one folder per hookpoint)
            local = local.parent
        try:
            if local.exists():
                coder = SparseCoder.load_from_disk(local / hookpoint if hookpoint else local, device=device)
            else:
                coder = SparseCoder.load_from_hub(str(coder_or_name), hookpoint=hookpoint, device=device)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LRSError(
                f"sparsify could not load {str(coder_or_name)!r} / {hookpoint!r}: {first}"
            ) from None
        source = {"name": str(coder_or_name), "hookpoint": hookpoint}
    else:
        coder = coder_or_name
    missing = [a for a in ("encoder", "W_dec", "b_dec", "cfg") if not hasattr(coder, a)]
    if missing:
        raise LRSError(
            f"{type(coder).__name__} does not look like a sparsify SparseCoder (missing {', '.join(missing)})"
        )
    if coder.W_dec is None:
        raise LRSError("this sparsify coder was loaded without its decoder: load it with decoder=True")
    if getattr(coder.cfg, "transcode", False):
        raise LRSError(
            "this sparsify coder is a transcoder (predicts another module's output), not an autoencoder"
        )
    W_enc = coder.encoder.weight.detach().float().cpu()
    enc = SparsifyEncoder(
        W_enc.shape[1],
        W_enc.shape[0],
        int(coder.cfg.k),
        activation=getattr(coder.cfg, "activation", "topk"),
        layer=_layer_from_hook(hookpoint, layer, "sparsify"),
    )
    b_enc = coder.encoder.bias
    enc.W_enc.copy_(W_enc)
    enc.b_enc.copy_(b_enc.detach().float().cpu() if b_enc is not None else torch.zeros(len(W_enc)))
    enc.W_dec.copy_(coder.W_dec.detach().float().cpu())
    enc.b_dec.copy_(coder.b_dec.detach().float().cpu())
    enc.source = source
    return enc.to(device)


LRS_PT_KEYS = ("encoder_weight", "encoder_bias", "decoder_weight", "b_dec", "topk", "activation_mean")


def load_lrs_pt(
    path: str | Path, *, layer: int | None = None, normalize: bool = True, rescale: bool = True
) -> TopKSAE:
    """Load the LRS / thinking-llms `.pt` SAE dict (weights_only, never unpickles objects) as a TopKSAE.

    The reference decodes without rescaling: pass `rescale=False` to reproduce it.
    """
    path = Path(path)
    if not path.is_file():
        raise LRSError(f"no SAE file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e).lower():
            raise LRSError(
                f"{path}: holds pickled Python objects that safe loading refuses; expected a plain dict of tensors"
            ) from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(f"{path}: not a readable torch .pt file (truncated or corrupt?): {first}") from None
    if not isinstance(obj, dict):
        raise LRSError(
            f"{path}: expected a dict with keys {', '.join(LRS_PT_KEYS)}, got {type(obj).__name__}"
        )
    missing = [key for key in LRS_PT_KEYS if key not in obj]
    if missing:
        raise LRSError(f"{path}: missing key(s) {', '.join(missing)} of the LRS SAE format")
    W_enc = torch.as_tensor(obj["encoder_weight"]).float()
    n, d = W_enc.shape
    shapes = {"encoder_bias": (n,), "decoder_weight": (d, n), "b_dec": (d,), "activation_mean": (d,)}
    for key, shape in shapes.items():
        if tuple(torch.as_tensor(obj[key]).shape) != shape:
            raise LRSError(
                f"{path}: {key} has shape {tuple(torch.as_tensor(obj[key]).shape)}, expected {shape}"
            )
    sae = TopKSAE(
        d, n, int(torch.as_tensor(obj["topk"]).item()), normalize=normalize, rescale=rescale, layer=layer
    )
    sae.W_enc.copy_(W_enc)
    sae.b_enc.copy_(torch.as_tensor(obj["encoder_bias"]).float())
    sae.W_dec.copy_(torch.as_tensor(obj["decoder_weight"]).float())
    sae.b_dec.copy_(torch.as_tensor(obj["b_dec"]).float())
    sae.mu.copy_(torch.as_tensor(obj["activation_mean"]).float())
    sae.metrics = {"source": str(path)}
    return sae
