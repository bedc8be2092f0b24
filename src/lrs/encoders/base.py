"""The encoder protocol and the helpers every encoder shares (input normalisation, hashing, checks)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lrs.artifacts import tensor_hash
from lrs.errors import LRSError

FORMAT = "lrs.encoder/1"
EPS = 1e-8
CHUNK = 8192  # rows converted to float32 at a time when streaming over stored (bf16) states


@runtime_checkable
class Encoder(Protocol):
    """What the reward model and the steering hook need from an encoder."""

    layer: int | None
    d_model: int
    n_latents: int
    kind: str

    def encode(self, h: Tensor) -> Tensor: ...

    def decode_delta(self, z_new: Tensor, z_old: Tensor, h: Tensor) -> Tensor: ...

    def config(self) -> dict: ...

    def tensors(self) -> dict[str, Tensor]: ...


# ---------------------------------------------------------------------------------------------- helpers


def _as_input(h: Tensor, d_model: int, ref: Tensor) -> Tensor:
    """Check the width and move h to the encoder's device as float32."""
    if h.shape[-1] != d_model:
        raise LRSError(f"encoder expects states of width {d_model} but got shape {tuple(h.shape)}")
    return h.to(device=ref.device, dtype=torch.float32)


def _centre(h: Tensor, mu: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    """x = h − μ, L2-normalised if asked; also returns ‖h − μ‖ [.., 1]."""
    x = h - mu
    norm = x.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return (x / norm if normalize else x), norm


def _finish(delta: Tensor, h: Tensor) -> Tensor:
    return delta.to(device=h.device, dtype=h.dtype)


def _check_states(states: Any, min_states: int) -> Tensor:
    if not isinstance(states, Tensor):
        raise LRSError(
            f"states must be a torch.Tensor [N, d] (e.g. TraceSet.states(layer)), got {type(states).__name__}"
        )
    if states.dim() != 2:
        raise LRSError(f"states must be 2-D [N, d], got shape {tuple(states.shape)}")
    if states.shape[0] < min_states:
        raise LRSError(
            f"got {states.shape[0]} states but fitting an encoder needs at least {min_states}: collect more traces"
        )
    return states


def _chunks(states: Tensor, idx: Tensor, size: int = CHUNK):
    for i in range(0, len(idx), size):
        yield states[idx[i : i + size]].float()


def _mean(states: Tensor, idx: Tensor) -> Tensor:
    """Float32 mean over the rows `idx`, streamed in chunks; rejects NaN/inf."""
    total = torch.zeros(states.shape[1], dtype=torch.float64)
    for x in _chunks(states, idx):
        total += x.sum(0, dtype=torch.float64)
    if not torch.isfinite(total).all():
        raise LRSError(
            "states contain NaN or inf: the traces are corrupt or the model overflowed (try bf16/fp32)"
        )
    return (total / len(idx)).float()


def _layer_cfg(c: dict) -> dict:
    return {"kind": c["kind"], "layer": c["layer"], "d_model": c["d_model"], "n_latents": c["n_latents"]}


def encoder_hash(enc: Encoder) -> str:
    """sha256 over the encoder's tensors (names, dtypes, shapes, bytes), independent of device."""
    return tensor_hash(enc.tensors())


def check_compatible(enc: Encoder, d_model: int, layer: int | None) -> None:
    """Raise LRSError if the encoder was fitted for another hidden size or another layer."""
    if enc.d_model != d_model:
        raise LRSError(
            f"encoder width {enc.d_model} does not match the model's hidden size {d_model}: "
            "use an encoder fitted on this model's states"
        )
    if enc.layer is not None and layer is not None and enc.layer != layer:
        raise LRSError(
            f"encoder was fitted at layer {enc.layer} but steering asks for layer {layer}: "
            f"steer at layer {enc.layer} or fit an encoder at layer {layer}"
        )
