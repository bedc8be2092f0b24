"""One save/load path for every artefact: tensors in safetensors, a JSON sidecar, both written atomically.

An artefact is ``NAME.safetensors`` plus ``NAME.json``. The sidecar carries the artefact's ``format`` (what
kind of object it is), its ``config`` (enough to rebuild it), a ``hash`` of the tensors (names, dtypes,
shapes, bytes), ``provenance`` (model, layer, data fingerprint, ...), ``metrics``, and ``created`` (the
command line, library versions and git revision). Loading verifies the format and the hash, so a changed,
truncated or swapped file is refused with one line instead of steering with garbage.

Both files are first written to temporary names and then renamed, the tensors first: a run killed at
any moment leaves either the old pair, or a new tensor file whose hash the old sidecar refuses.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lrs.environment import created_info
from lrs.errors import LRSError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed onto ``path`` when the block ends cleanly and
    deleted when it raises, so ``path`` is never half-written."""
    path = Path(path)
    if path.is_dir():
        raise LRSError(f"{path} is a directory, not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (never a half-written file)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """``atomic_write_text`` of ``obj`` as indented JSON (NaN/inf become null: strict JSON readers accept it)."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=1) + "\n")


def atomic_save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None):
    """``safetensors`` file written through a temporary name and a rename."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return Path(path)


def tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of the tensors, independent of device and dict order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def jsonable(x: Any) -> Any:
    """Plain JSON values: tensors and numpy scalars become numbers/lists, non-finite floats become None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            return jsonable(x.item())
        except (TypeError, ValueError):
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return str(x)


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_artifact(
    path: str | Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    format: str,
    config: dict,
    provenance: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write ``path`` (safetensors) and its ``.json`` sidecar atomically; returns ``path``."""
    path = Path(path)
    if path.suffix == ".json":
        raise LRSError(f"{path}: give the tensor file name (e.g. {format.split('.')[-1]}.safetensors)")
    if path.is_dir():
        raise LRSError(f"{path} is a directory: give a file name ending in .safetensors")
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LRSError(f"refusing to save {path.name}: tensor '{name}' holds NaN or inf values")
    sidecar = dict(
        format=format,
        config=jsonable(config),
        hash=tensor_hash(tensors),
        provenance=jsonable(provenance or {}),
        metrics=jsonable(metrics or {}),
        created=created_info(),
        weights=path.name,
    )
    atomic_save_tensors(path, tensors, metadata={"format": format})
    atomic_write_json(sidecar_path(path), sidecar)
    return path


def read_sidecar(path: str | Path, format: str, what: str) -> tuple[Path, dict]:
    """Resolve ``path`` (tensor file or sidecar) and return (tensor path, sidecar dict) or raise one line."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        try:
            path = path.with_name(json.loads(path.read_text())["weights"])
        except (ValueError, KeyError, TypeError):
            raise LRSError(f"{path}: not an lrs {what} sidecar") from None
    if not path.is_file():
        raise LRSError(f"no {what} file at {path}")
    side = sidecar_path(path)
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or meta.get("format") != format or not isinstance(meta.get("config"), dict):
        found = meta.get("format") if isinstance(meta, dict) else None
        extra = f" (its sidecar says '{found}')" if found else f" (no valid sidecar {side.name})"
        raise LRSError(f"{path}: not an lrs {what}{extra}")
    return path, meta


def load_artifact(path: str | Path, *, format: str, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an artefact written by :func:`save_artifact`; verifies format and hash. Returns (tensors, sidecar)."""
    path, meta = read_sidecar(path, format, what)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LRSError(f"{path}: not a readable safetensors file ({first})") from None
    if not meta.get("hash"):
        raise LRSError(
            f"{path}: the sidecar carries no hash (written by an older lrs): create the {what} again"
        )
    if tensor_hash(tensors) != meta["hash"]:
        raise LRSError(
            f"{path}: tensors do not match the hash in {sidecar_path(path).name}: the file was changed or corrupted"
        )
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LRSError(f"{path}: tensor '{name}' holds NaN or inf values")
    return tensors, meta
