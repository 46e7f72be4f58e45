"""CLI commands of the metric-space exploration: `loc2vec explore` and `loc2vec similar`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands to the `loc2vec` parser."""
