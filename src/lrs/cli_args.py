"""Config dataclasses as command-line flags: one ``--field-name`` per field (help and default from the field),
and the dataclass rebuilt from the parsed namespace. Shared by ``lrs.cli`` and the sub-commands that the
analysis and integrations packages add, so none of them imports the top-level command line."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

_TYPES = {"int": int, "float": float, "str": str}


def add_config(p: argparse.ArgumentParser, cls: type, defaults: dict | None = None, skip: tuple = ()) -> None:
    """Add one flag per field of dataclass ``cls`` (``--field-name``), with the field's help and default."""
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        meta = dict(f.metadata)
        help_ = meta.pop("help", "")
        kind = str(f.type).replace(" | None", "")
        if kind == "bool":
            if default:
                p.add_argument(
                    f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false", help=help_
                )
            else:
                p.add_argument(flag, dest=f.name, action="store_true", help=help_)
            continue
        if kind.startswith("list["):
            meta.setdefault("nargs", "+")
            kind = kind[5:-1]
        shown = "" if default is None else f" (default {default})"
        p.add_argument(flag, dest=f.name, type=_TYPES[kind], default=default, help=help_ + shown, **meta)


def build(cls: type, args: argparse.Namespace) -> Any:
    """The dataclass ``cls`` filled from parsed ``args`` (fields not on the command line keep their default)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})
