"""CLI commands of the orchestration layer: champion promotion, params and pipeline runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the `loc2vec` parser."""
