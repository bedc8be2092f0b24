"""What this process runs on: library versions, git revision, device and dtype choice (``lrs doctor``).

Everything here is recorded in artefact sidecars and result summaries, so a figure can always be traced back
to the versions, device and code that produced it.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

from lrs import __version__
from lrs.errors import LRSError

PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "math-verify", "numpy", "tokenizers")


def versions() -> dict[str, str]:
    """Versions of lrs, Python and the libraries whose behaviour changes results."""
    out = {"lrs": __version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


@functools.cache
def git_revision() -> str | None:
    """The git commit of the lrs source tree (with ``-dirty`` when it has local changes), if it is a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev or None


def command_line() -> str:
    """The command that is running, e.g. ``lrs fit-encoder --latents 64``."""
    if not sys.argv:
        return ""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


def created_info() -> dict:
    """Provenance of a file being written now: command, time, versions, git revision."""
    return dict(
        command=command_line(),
        time=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions=versions(),
        git=git_revision(),
    )


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 matmuls (AVX512-BF16 or AMX); without them bf16 is ~2x slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA if available, else MPS, else CPU; an explicit device that is absent is a one-line error.

    Under a data-parallel launcher (WORLD_SIZE > 1), ``auto`` and ``cuda`` mean this process's GPU, LOCAL_RANK."""
    name = str(device or "auto")
    local = os.environ.get("LOCAL_RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if name in ("auto", "cuda") and local is not None and torch.cuda.is_available():
        name = f"cuda:{int(local)}"  # data-parallel launch: one GPU per process
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise LRSError(f"unknown device '{name}': use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LRSError(
                f"--device {name}: this torch build or machine has no CUDA device (use cpu or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LRSError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise LRSError(f"--device {name}: MPS is not available on this machine (use cpu or auto)")
    elif dev.type != "cpu":
        raise LRSError(f"unsupported device '{name}': use auto, cpu, cuda, cuda:N or mps")
    return dev


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


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to load a model in, and why (``auto``: bf16 on accelerators and bf16-native CPUs, else fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype, "given"
    if dtype == "auto":
        if device.type != "cpu":
            return torch.bfloat16, f"auto: bf16 on {device.type}"
        if cpu_has_fast_bf16():
            return torch.bfloat16, "auto: the CPU has native bf16 (avx512_bf16/amx_bf16)"
        return torch.float32, "auto: the CPU has no native bf16, where bf16 is 2-3x slower than fp32"
    if dtype not in DTYPES:
        raise LRSError(f"unknown dtype '{dtype}': use one of auto, bfloat16, float16, float32")
    return DTYPES[dtype], "given"


def doctor(device: str = "auto", dtype: str = "auto") -> str:
    """The text of ``lrs doctor``: versions, git revision, device and the dtype ``auto`` picks, and why."""
    lines = [f"{k:13s} {v}" for k, v in versions().items()]
    lines.append(f"{'git':13s} {git_revision() or 'not a git checkout'}")
    lines.append(f"{'platform':13s} {platform.platform()}, {torch.get_num_threads()} torch threads")
    lines.append(
        f"{'cuda':13s} {torch.cuda.device_count() if torch.cuda.is_available() else 'not available'}"
    )
    dev = resolve_device(device)
    dt, why = resolve_dtype(dtype, dev)
    lines.append(f"{'device':13s} {dev} (asked: {device})")
    lines.append(f"{'dtype':13s} {str(dt).replace('torch.', '')} ({why})")
    lines.append(f"{'cpu bf16':13s} {'native' if cpu_has_fast_bf16() else 'emulated (slow)'}")
    return "\n".join(lines)
