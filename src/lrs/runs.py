"""The run directory: the one place that knows where artefacts and results live and how caches are keyed.

Layout of ``runs/<task>-<model>/`` (or ``--run DIR``)::

    traces/                          stage 1 (manifest.json + shards)
    encoder.safetensors (+ .json)    stage 2a
    reward.safetensors (+ .json)     stage 2b
    tune/<artefact key>/             dev results of every grid point + tune.json (the choice)
    eval/<task>/<split>/<method>.*   per-problem JSONL + summary JSON
    report.md, *.png

A cached result is reused only when its ``cache_key`` (a hash of method config, problem ids, model
fingerprint, artefact hashes, dtype, token budget, batch size, seed and prompt style) equals the key of the
run being asked for, so a changed encoder or reward model never reuses an old result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lrs.errors import LRSError


def cache_key(parts: dict) -> str:
    """A 16-hex-digit hash of a JSON-able dict (sorted keys), stable across processes and machines."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def exclusive(lock: Path, what: str) -> Iterator[None]:
    """Hold an advisory lock on ``lock`` for the block; if another process holds it, one line naming it.

    The lock file records the holder's pid and command line, so the message says who is writing.
    """
    import fcntl

    from lrs.environment import command_line

    lock.parent.mkdir(parents=True, exist_ok=True)
    f = open(lock, "a+")  # noqa: SIM115 - held for the duration of the block
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise LRSError(
                f"{what} is in use by {holder}; wait for it to finish or use another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} (`{command_line()}`)")
        f.flush()
        yield
    finally:
        f.close()


def check_dir_target(path: Path, what: str) -> Path:
    """Refuse an output that must be a directory but is an existing file (before any work starts)."""
    if path.exists() and not path.is_dir():
        raise LRSError(f"{what} {path} is a file, not a directory")
    return path


def check_file_target(path: Path, what: str) -> Path:
    """Refuse an artefact output that is an existing directory or whose parent is a file (before any work)."""
    if path.is_dir():
        raise LRSError(f"{what} {path} is a directory: give a file name ending in .safetensors")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise LRSError(f"{what} {path}: {parent} is a file, not a directory")
            break
    return path


def slug(text: str) -> str:
    """A file-name-safe short name: ``jsonl:data/my.jsonl`` -> ``jsonl-my``, a model path -> its folder name."""
    text = text.rstrip("/")
    if text.startswith("jsonl:"):
        return "jsonl-" + Path(text[6:]).stem
    if text.startswith("hf:"):
        return "hf-" + text[3:].replace("/", "-").replace(":", "-")
    return Path(text).name.replace(".gguf", "") or "model"


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @classmethod
    def for_run(cls, run: str | None, task: str, model: str | None) -> RunDir:
        """``run`` if given, else ``runs/<task>-<model>``."""
        from lrs.packaged import DEFAULT_MODEL

        if run:
            return cls(check_dir_target(Path(run), "--run"))
        return cls(Path("runs") / f"{slug(task)}-{slug(model or DEFAULT_MODEL)}")

    @property
    def traces(self) -> Path:
        return self.root / "traces"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder.safetensors"

    @property
    def reward(self) -> Path:
        return self.root / "reward.safetensors"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def eval_dir(self, task: str, split: str) -> Path:
        return self.root / "eval" / slug(task) / split

    def tune_dir(self, artefact_key: str) -> Path:
        return self.root / "tune" / artefact_key

    def tune_file(self, artefact_key: str) -> Path:
        return self.tune_dir(artefact_key) / "tune.json"

    def tuned_beats_base(self, artefact_key: str) -> dict:
        """``beats_base_on_dev`` of the tuning result (method -> True/False, None without a base run); {} if
        absent or unreadable (:meth:`load_tuned` reports those)."""
        try:
            got = json.loads(self.tune_file(artefact_key).read_text()).get("beats_base_on_dev")
        except (OSError, ValueError, AttributeError):
            return {}
        return got if isinstance(got, dict) else {}

    def load_tuned(self, artefact_key: str) -> dict:
        """The settings ``lrs tune`` chose for these artefacts, or a one-line error saying how to get them."""
        path = self.tune_file(artefact_key)
        if not path.exists():
            raise LRSError(
                f"--tuned: no tuning result for these artefacts in {self.root / 'tune'} (key {artefact_key}): "
                "run `lrs tune` with the same --encoder/--reward/--max-new-tokens first"
            )
        try:
            best = json.loads(path.read_text())["best"]
        except (ValueError, KeyError, TypeError):
            raise LRSError(f"{path}: not a tuning result (no 'best' entry); run `lrs tune` again") from None
        if not isinstance(best, dict) or not all(isinstance(v, dict) for v in best.values()):
            raise LRSError(f"{path}: 'best' is not a mapping of method -> settings; run `lrs tune` again")
        return best

    def lock(self, name: str, what: str | None = None):
        """An exclusive lock on one job inside the run (``collect``, ``eval-<method>``, ``tune``, ...)."""
        return exclusive(self.root / ".locks" / f"{name}.lock", what or f"{self.root} ({name})")
