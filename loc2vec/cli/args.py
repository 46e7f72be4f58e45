"""Argument types every command shares: coordinates, finite numbers, region lists."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from loc2vec.core.config import Params
from loc2vec.core.errors import ConfigError
from loc2vec.core.names import check_region_name


def finite(name: str, lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number in [lo, hi], or a message naming the option."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{name} must be a finite number in [{lo:g}, {hi:g}], got {text!r}")
        return value

    return parse


LAT = finite("latitude", -90.0, 90.0)
LON = finite("longitude", -180.0, 180.0)


def add_location(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """--lat and --lon (both required, unless the command takes its locations another way)."""
    parser.add_argument("--lat", type=LAT, required=required)
    parser.add_argument("--lon", type=LON, required=required)


def split_regions(values: str | Sequence[str] | None) -> list[str]:
    """'a,b', ['a', 'b'] or ['a,b'] → ['a', 'b'] (blanks dropped, order kept)."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    return [r.strip() for item in items for r in item.split(",") if r.strip()]


def regions(values: str | Sequence[str] | None, params: Params, *, default: Sequence[str] | None = None) -> list[str]:
    """Validated region names from an option; none given: `default` (else the pipeline's regions)."""
    names = split_regions(values) or list(default if default is not None else params.pipeline_regions)
    return [check_region_name(r, params.reserved_schemas) for r in names]


def one_region(value: str, params: Params) -> str:
    """Exactly one validated region name (a list where one is expected is an error, not its first item)."""
    names = regions(value, params, default=[])
    if len(names) != 1:
        raise ConfigError(f"expected one region, got {value!r}")
    return names[0]
