"""Steering vectors to and from the formats other tools read: GGUF control vectors and steering-vectors.

A GGUF control vector is the file llama.cpp takes with ``--control-vector`` and repeng reads and writes with
``ControlVector.import_gguf`` / ``export_gguf``: architecture ``controlvector``, a ``controlvector.model_hint``
string, ``controlvector.layer_count``, and one float32 tensor ``direction.L`` per layer. Both tools add
``direction.L`` to the output of decoder block ``L`` (0-based, the block index lrs uses) at *every*
position, prompt included, which is what an lrs artefact with ``positions="all"`` does (the RL-trained bias
vectors). Two differences are reported, not hidden:

- llama.cpp refuses a file with ``direction.0`` (block 0 cannot be steered there), so by default block 0's
  vector is left out of the file and its norm reported; ``for_llama_cpp=False`` keeps it for repeng.
- lrs diffmean vectors act on generated tokens only; exported, they act on the prompt too.

The scale ``alpha`` is multiplied in on export (the formats have no scale; llama.cpp takes a strength at
load time). The packaged models are GGUF files, so vectors trained here run unchanged in llama.cpp on the
same model file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lrs.artifacts import atomic_path
from lrs.errors import LRSError
from lrs.steering.vectors import SteeringVectors

ARCH = "controlvector"


def export_gguf(
    vectors: SteeringVectors,
    path: str | Path,
    model_hint: str | None = None,
    *,
    for_llama_cpp: bool = True,
) -> list[str]:
    """Write ``alpha * vectors`` as a GGUF control vector at ``path`` (atomically).

    ``model_hint`` is the model type the vectors belong to (repeng stores ``config.model_type``; llama.cpp
    ignores it); by default the model named in the vectors' provenance. ``for_llama_cpp`` leaves block 0 out
    (llama.cpp rejects the whole file otherwise). Returns the caveats that apply to the written file in the
    other tools (empty when it behaves there exactly as in lrs).
    """
    import gguf

    path = Path(path)
    if path.suffix != ".gguf":
        raise LRSError(f"a GGUF control vector file must end in .gguf, got {path}")
    hint = model_hint or str(vectors.provenance.get("model") or "unknown")
    layers = gguf_layers(vectors, for_llama_cpp)
    if not layers:
        raise LRSError(
            "llama.cpp cannot steer block 0, the only layer of these vectors (for_llama_cpp=False "
            "writes it for repeng)"
        )
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(layers))
        for L in layers:
            v = (vectors.alpha * vectors.vectors[L].float()).cpu().numpy().astype(np.float32)
            writer.add_tensor(f"direction.{L}", v)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return export_caveats(vectors, for_llama_cpp)


def gguf_layers(vectors: SteeringVectors, for_llama_cpp: bool = True) -> list[int]:
    """The layers :func:`export_gguf` writes: all of them, but block 0 when the file is for llama.cpp."""
    return sorted(L for L in vectors.vectors if L > 0 or not for_llama_cpp)


def export_caveats(vectors: SteeringVectors, for_llama_cpp: bool = True) -> list[str]:
    """What changes when these vectors run in llama.cpp / repeng instead of lrs."""
    notes = []
    if vectors.positions != "all":
        notes.append(
            "these vectors act on generated tokens only in lrs; llama.cpp and repeng add them at every "
            "position, the prompt included"
        )
    norm0 = float(vectors.alpha * vectors.vectors[0].float().norm()) if 0 in vectors.vectors else 0.0
    if norm0 > 0:
        notes.append(
            f"block 0's vector (norm {norm0:.3g}) is left out: llama.cpp refuses direction.0"
            if for_llama_cpp
            else "the file holds direction.0 (block 0): repeng applies it, llama.cpp refuses the file"
        )
    return notes


def import_gguf(path: str | Path) -> SteeringVectors:
    """Read a GGUF control vector (llama.cpp / repeng) as lrs vectors acting at every position, alpha 1."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise LRSError(f"no GGUF control vector at {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError / struct.error / OSError on foreign or cut files
        raise LRSError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise LRSError(f"{path} is a GGUF file of architecture {arch!r}, not a control vector")
    vecs: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        prefix, _, layer = t.name.partition(".")
        if prefix != "direction" or not layer.isdigit():
            raise LRSError(f"{path}: unexpected tensor {t.name!r} in a control vector (want direction.N)")
        vecs[int(layer)] = torch.from_numpy(np.array(t.data, dtype=np.float32).reshape(-1))
    if not vecs:
        raise LRSError(f"{path} holds no direction.N tensors")
    widths = {v.numel() for v in vecs.values()}
    if len(widths) > 1:
        raise LRSError(f"{path}: directions of different widths {sorted(widths)}")
    prov = dict(imported_from=str(path), model=_field(reader, f"{ARCH}.model_hint"), positions="all")
    return SteeringVectors(vecs, 1.0, source="gguf", provenance=prov, positions="all")


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8") if f.types and f.types[0].name == "STRING" else None


def to_steering_vector(vectors: SteeringVectors, *, prompt_too: bool = False):
    """The vectors as a ``steering_vectors.SteeringVector`` (block outputs, ``alpha`` multiplied in).

    steering-vectors adds at every position (``min_token_index`` counts positions within each forward call,
    so with a KV cache it cannot express "generated tokens only"). Vectors with ``positions="all"`` (the
    RL-trained ones) therefore convert exactly; generated-only vectors are refused unless ``prompt_too``.
    """
    if vectors.positions != "all" and not prompt_too:
        raise LRSError(
            "these vectors act on generated tokens only; steering-vectors would add them to the prompt too "
            "(pass prompt_too=True to accept that)"
        )
    try:
        from steering_vectors import SteeringVector
    except ImportError:
        raise LRSError(
            "to_steering_vector needs the steering-vectors package: pip install steering-vectors"
        ) from None
    acts = {L: vectors.alpha * v.float() for L, v in sorted(vectors.vectors.items())}
    return SteeringVector(layer_activations=acts, layer_type="decoder_block")


def from_steering_vector(sv, *, positions: str = "all") -> SteeringVectors:
    """lrs vectors from a ``steering_vectors.SteeringVector`` of ``decoder_block`` outputs."""
    if getattr(sv, "layer_type", "decoder_block") != "decoder_block":
        raise LRSError(f"only decoder_block steering vectors map to lrs layers, got {sv.layer_type!r}")
    vecs = {int(L): torch.as_tensor(v).detach().float().cpu() for L, v in sv.layer_activations.items()}
    return SteeringVectors(vecs, 1.0, source="steering-vectors", positions=positions)
