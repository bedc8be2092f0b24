"""Resumable state of a training run: checkpoints (parameters, AdamW state, torch RNG, step) and the JSONL log.

``checkpoints/step-NNNNNN.safetensors`` (+ sidecar, hash-checked on load) is written first and
``checkpoints/latest.json`` is switched to it last, both atomically: a run killed at any moment leaves a
pointer to a complete checkpoint. The step is also the data cursor (problem order is a function of it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path

import torch

from lrs.artifacts import atomic_write_json, load_artifact, save_artifact
from lrs.errors import LRSError
from lrs.models import model_fingerprint, model_name
from lrs.trainers.config import TrainConfig

CKPT_FORMAT = "lrs.rl-checkpoint/1"
RESUMABLE = ("steps", "out", "checkpoint_every")  # settings a resumed run may change
LATRO_ONLY = ("latro_beta", "latro_gamma", "answer_weight", "answer_template", "answer_end")


def _changed(saved: dict, cfg: TrainConfig) -> list[str]:
    """Settings that differ between a checkpoint and ``cfg`` and matter to the run: a setting the saved
    config lacks (added by a later lrs) counts as its default, and LaTRO's settings do not matter to a
    verifier run nor the LoRA rank to a bias run, so a run started by an older lrs still resumes."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    now = asdict(cfg)
    ignore = set(RESUMABLE)
    if cfg.objective != "latro":
        ignore.update(LATRO_ONLY)
    if cfg.param != "lora":
        ignore.add("lora_rank")
    return sorted(k for k in now if k not in ignore and saved.get(k, defaults.get(k)) != now[k])


def _ckpt_dir(out: Path) -> Path:
    return out / "checkpoints"


def save_checkpoint(out: Path, step: int, named, opt, cfg: TrainConfig, model) -> Path:
    """Parameters, AdamW state and torch RNG after ``step`` updates; ``latest.json`` is switched last."""
    tensors = {f"param.{n}": p.detach() for n, p in named}
    for i, st in opt.state_dict()["state"].items():
        for key, v in st.items():
            tensors[f"opt.{i}.{key}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    path = _ckpt_dir(out) / f"step-{step:06d}.safetensors"
    prov = dict(model=model_name(model), model_fingerprint=model_fingerprint(model))
    save_artifact(
        path, tensors, format=CKPT_FORMAT, config=dict(step=step, train=asdict(cfg)), provenance=prov
    )
    atomic_write_json(_ckpt_dir(out) / "latest.json", dict(step=step, path=path.name))
    for old in sorted(_ckpt_dir(out).glob("step-*.safetensors"))[:-2]:  # keep this one and the one before
        old.unlink(missing_ok=True)
        old.with_suffix(".json").unlink(missing_ok=True)
    return path


def load_checkpoint(out: Path, named, opt, cfg: TrainConfig, model) -> int:
    """Restore the newest checkpoint in ``out`` (refusing a different config or model); returns its step."""
    latest = _ckpt_dir(out) / "latest.json"
    if not latest.is_file():
        return 0
    try:
        name = json.loads(latest.read_text())["path"]
    except (ValueError, KeyError, TypeError):
        raise LRSError(f"{latest}: not a checkpoint pointer; delete {_ckpt_dir(out)} to start over") from None
    tensors, meta = load_artifact(_ckpt_dir(out) / name, format=CKPT_FORMAT, what="training checkpoint")
    if int(meta["config"]["step"]) > cfg.steps:
        raise LRSError(
            f"{out} holds a checkpoint at step {meta['config']['step']}, beyond --steps {cfg.steps}: "
            "give at least that many steps, or use another directory"
        )
    saved, now = meta["config"]["train"], asdict(cfg)
    diff = _changed(saved, cfg)
    if diff:
        what = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise LRSError(f"{out} holds a run with other settings ({what}): use another directory")
    if meta["provenance"].get("model_fingerprint") != model_fingerprint(model):
        raise LRSError(
            f"{out} was trained on another model ({meta['provenance'].get('model')}): use another directory"
        )
    with torch.no_grad():
        for n, p in named:
            if f"param.{n}" not in tensors:
                raise LRSError(f"checkpoint {name} has no parameter '{n}': use another directory")
            p.copy_(tensors[f"param.{n}"])
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict(dict(state=state, param_groups=opt.state_dict()["param_groups"]))
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["config"]["step"])


def read_log(path: Path, upto: int | None = None) -> list[dict]:
    """The JSONL log (lines for steps <= ``upto``; a torn last line from a kill is dropped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if upto is None or rec.get("step", 0) <= upto:
            out.append(rec)
    return out
