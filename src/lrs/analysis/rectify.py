"""Placeholder: filled in by issue 11."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add this analysis's `lrs analyze` sub-command (none yet)."""
