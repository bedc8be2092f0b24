"""Saving and loading encoders through :mod:`lrs.artifacts` (safetensors + hash-checked sidecar)."""

from __future__ import annotations

from pathlib import Path

from lrs.artifacts import load_artifact, save_artifact
from lrs.encoders.adapters import SparsifyEncoder, from_saelens
from lrs.encoders.base import (
    FORMAT,
    Encoder,
    _layer_cfg,
)
from lrs.encoders.baselines import IdentityEncoder, PCAEncoder
from lrs.encoders.topk import TopKSAE
from lrs.errors import LRSError


def save_encoder(
    enc: Encoder, path: str | Path, *, metrics: dict | None = None, provenance: dict | None = None
) -> Path:
    """Write `path` (safetensors) and `path.with_suffix('.json')` (config, metrics, provenance, hash), atomically."""
    c = enc.config()
    config = {**_layer_cfg(c), "options": {k: v for k, v in c.items() if k not in _layer_cfg(c)}}
    return save_artifact(
        path,
        enc.tensors(),
        format=FORMAT,
        config=config,
        provenance=provenance if provenance is not None else getattr(enc, "provenance", {}),
        metrics=metrics if metrics is not None else getattr(enc, "metrics", {}),
    )


KINDS = {cls.kind: cls for cls in (TopKSAE, IdentityEncoder, PCAEncoder, SparsifyEncoder)}


def load_encoder(path: str | Path) -> Encoder:
    """Load an encoder written by `save_encoder` (the tensor file or its .json sidecar); checks the hash."""
    path = Path(path)
    if path.suffix == ".pt":
        raise LRSError(f"{path}: not an lrs encoder (an LRS/thinking-llms .pt SAE loads with load_lrs_pt)")
    tensors, meta = load_artifact(path, format=FORMAT, what="encoder")
    c = meta["config"]
    config = {**c.get("options", {}), **_layer_cfg(c)}
    kind = c["kind"]
    if kind == "saelens" and "saelens_cfg" in config:  # by value: the artefact alone rebuilds the SAE
        from lrs.encoders.adapters import SAELensEncoder

        enc = SAELensEncoder.from_saved(config, tensors)
    elif kind == "saelens":
        if "release" not in config:
            raise LRSError(
                f"{path}: a SAELens SAE wrapped from an object cannot be reloaded: use from_saelens()"
            )
        enc = from_saelens(config["release"], config["sae_id"], layer=config["layer"])
    elif kind in KINDS:
        try:
            enc = KINDS[kind].from_saved(config, tensors)
        except (KeyError, RuntimeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise LRSError(f"{path}: tensors do not match the {kind} config ({first})") from None
    else:
        raise LRSError(f"{path}: unknown encoder kind {kind!r} (known: {', '.join([*KINDS, 'saelens'])})")
    enc.metrics, enc.provenance = meta.get("metrics", {}), meta.get("provenance", {})
    return enc
