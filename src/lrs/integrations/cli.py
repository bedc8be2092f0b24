"""Top-level ``lrs`` sub-commands of the integrations; each sets ``func`` on its parser."""

from __future__ import annotations

import argparse


def add_cli(sub: argparse._SubParsersAction) -> None:
    """Add the integrations' sub-commands (none yet)."""
