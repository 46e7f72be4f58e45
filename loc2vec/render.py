"""Rasterize the surroundings of a location into a (12, size, size) uint8 tensor with Mapnik.

Augmentation happens *before* rasterization, as in the article: the vector geometry is
rotated about the tile centre (Mapnik's ``geometry-transform="rotate(-@angle …)"``, the
angle passed per render) and the window is moved by the shift, and only then drawn, so
lines and polygons stay crisp at any angle instead of being resampled. The window is
sized in true metres (Web Mercator scaled by 1/cos φ), and its query margin covers the
rotated corners. The 12 Mapnik maps (one per channel) are parsed once per process; only
their extent and the angle change from tile to tile. (A per-tile rotated projection was
tried first: Mapnik keeps every PROJ transform it builds, ~0.2 MB each, and it was
40% slower.)
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import mapnik
import numpy as np

from loc2vec.atomic import atomic_path
from loc2vec.channels import CHANNELS, Channel
from loc2vec.config import load_params
from loc2vec.db import ConnInfo, ImportRecord, conninfo, require_import
from loc2vec.errors import Loc2VecError
from loc2vec.osm import check_region_name

log = logging.getLogger(__name__)
ATTRIBUTION = "© OpenStreetMap contributors"
_WORLD_3857 = "-20037508.34,-20037508.34,20037508.34,20037508.34"
EARTH_RADIUS_M = 6378137.0  # Web Mercator sphere
MAX_FEATURE_M = 16.0  # widest line (motorway) in channels.py


class RenderError(Loc2VecError, ValueError):
    """A tile cannot be rendered for these inputs (bad coordinates, outside the region, …)."""


def mercator_scale(lat: float) -> float:
    """Web Mercator units per true metre at this latitude (1 / cos φ)."""
    return 1.0 / math.cos(math.radians(lat))


def lonlat_to_mercator(lon: float, lat: float) -> tuple[float, float]:
    x = math.radians(lon) * EARTH_RADIUS_M
    y = math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) * EARTH_RADIUS_M
    return x, y


def min_buffer_px(size: int, max_feature_px: float) -> int:
    """Pixels of query margin so a rotated tile's corners (√2·r from the centre) are fully drawn."""
    return int(math.ceil(size * (math.sqrt(2.0) - 1.0) / 2.0 + max_feature_px))


def _symbolizer(channel: Channel, px_per_m: float, size: int) -> str:
    rotate = f'geometry-transform="rotate(-@angle, {size / 2:g}, {size / 2:g})"'
    if channel.kind == "polygon":
        return f'<PolygonSymbolizer fill="white" gamma="0.6" {rotate}/>'
    if channel.kind == "line":
        return (
            f'<LineSymbolizer stroke="white" stroke-width="[w]*{px_per_m:.6f}" '
            f'stroke-linecap="round" stroke-linejoin="round" {rotate}/>'
        )
    return (
        f'<MarkersSymbolizer marker-type="ellipse" width="[w]*{px_per_m:.6f}" height="[w]*{px_per_m:.6f}" '
        f'fill="white" stroke-width="0" allow-overlap="true" ignore-placement="true" {rotate}/>'
    )


def channel_map_xml(channel: Channel, schema: str, info: ConnInfo, px_per_m: float, buffer_px: int, size: int) -> str:
    """Mapnik XML for one channel: one layer from PostGIS, drawn white on transparent."""
    params = {
        "type": "postgis",
        "host": info.host,  # the wheel's libpq looks for sockets in /tmp: always explicit
        "port": str(info.port),
        "dbname": info.dbname,
        "user": info.user,
        "password": info.password or "",
        "table": f"({channel.sql.format(schema=_quote_ident(schema))}) AS t",
        "geometry_field": "way",
        "srid": "3857",
        "extent": _WORLD_3857,
        "estimate_extent": "false",
        "max_size": "2",
        "persist_connection": "true",
    }
    ds = "".join(f"<Parameter name={quoteattr(k)}>{escape(v)}</Parameter>" for k, v in params.items())
    return (
        f'<Map srs="epsg:3857" background-color="transparent" buffer-size="{buffer_px}">'
        f'<Style name="s"><Rule>{_symbolizer(channel, px_per_m, size)}</Rule></Style>'
        f'<Layer name={quoteattr(channel.name)} srs="epsg:3857"><StyleName>s</StyleName>'
        f"<Datasource>{ds}</Datasource></Layer></Map>"
    )


def _quote_ident(name: str) -> str:
    check_region_name(name)  # validated: only [a-z][a-z0-9_]*
    return f'"{name}"'


@dataclass(frozen=True)
class TileSpec:
    radius_m: float
    size: int

    @property
    def metres_per_pixel(self) -> float:
        return 2.0 * self.radius_m / self.size


class TileRenderer:
    """The 12 channel maps of one region, built once; renders tiles on demand (one per process)."""

    def __init__(self, region: str, spec: TileSpec, info: ConnInfo | None = None, buffer_px: int | None = None):
        self.region = check_region_name(region)
        self.spec = spec
        self.info = info or conninfo()
        self.record: ImportRecord = require_import(region, self.info)
        px_per_m = 1.0 / spec.metres_per_pixel
        buffer_px = max(
            load_params().render.buffer_px if buffer_px is None else buffer_px,
            min_buffer_px(spec.size, MAX_FEATURE_M * px_per_m),
        )
        self._maps: list[mapnik.Map] = []
        for channel in CHANNELS:
            m = mapnik.Map(spec.size, spec.size)
            mapnik.load_map_from_string(m, channel_map_xml(channel, region, self.info, px_per_m, buffer_px, spec.size))
            self._maps.append(m)
        self._image = mapnik.Image(spec.size, spec.size)
        self._lock = threading.Lock()  # Mapnik maps are not thread-safe; processes scale, threads don't

    def render(
        self, lat: float, lon: float, angle_deg: float = 0.0, shift_m: tuple[float, float] = (0.0, 0.0)
    ) -> np.ndarray:
        size = self.spec.size
        k = mercator_scale(lat)
        x, y = lonlat_to_mercator(lon, lat)
        x, y, r = x + shift_m[0] * k, y + shift_m[1] * k, self.spec.radius_m * k
        box = mapnik.Box2d(x - r, y - r, x + r, y + r)
        variables = {"angle": float(angle_deg)}
        out = np.empty((len(self._maps), size, size), dtype=np.uint8)
        with self._lock:
            for i, m in enumerate(self._maps):
                m.zoom_to_box(box)
                self._image.clear()
                mapnik.render_with_vars(m, self._image, variables)
                rgba = np.frombuffer(self._image.to_string(), dtype=np.uint8).reshape(size, size, 4)
                out[i] = rgba[..., 3]
        return out


_RENDERERS: dict[tuple, TileRenderer] = {}


def get_renderer(region: str, radius_m: float | None = None, size: int | None = None) -> TileRenderer:
    """The per-process renderer for a region (maps are parsed once, then reused)."""
    cfg = load_params().render
    spec = TileSpec(radius_m=float(radius_m or cfg.radius_m), size=int(size or cfg.size))
    info = conninfo()
    key = (os.getpid(), region, spec, info)
    renderer = _RENDERERS.get(key)
    if renderer is None:
        renderer = _RENDERERS[key] = TileRenderer(region, spec, info)
    return renderer


def validate_location(lat: float, lon: float, record: ImportRecord | None = None) -> None:
    for name, value, limit in (("latitude", lat, 90.0), ("longitude", lon, 180.0)):
        if not isinstance(value, int | float) or not math.isfinite(value) or abs(value) > limit:
            raise RenderError(f"{name} must be a finite number in [-{limit:g}, {limit:g}], got {value!r}")
    if record is not None and not record.contains(lat, lon):
        w, s, e, n = record.bbox
        raise RenderError(
            f"({lat}, {lon}) is outside region {record.region!r} (lat {s:.4f}..{n:.4f}, lon {w:.4f}..{e:.4f})"
        )


def render_tile(
    region: str,
    lat: float,
    lon: float,
    *,
    radius_m: float = 100.0,
    size: int = 128,
    angle_deg: float = 0.0,
    shift_m: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Render the (12, size, size) uint8 tile around (lat, lon), rotated CCW by angle_deg and with
    its centre moved shift_m = (east, north) metres, from the region's PostGIS import."""
    validate_location(lat, lon)
    if not (radius_m > 0 and math.isfinite(radius_m)) or size < 8:
        raise RenderError(f"radius_m must be > 0 and size ≥ 8, got radius_m={radius_m}, size={size}")
    if not all(math.isfinite(v) for v in (angle_deg, *shift_m)):
        raise RenderError(f"angle and shift must be finite, got angle={angle_deg}, shift={shift_m}")
    renderer = get_renderer(region, radius_m, size)
    validate_location(lat, lon, renderer.record)
    return renderer.render(lat, lon, angle_deg, (float(shift_m[0]), float(shift_m[1])))


# ---------------------------------------------------------------- pictures for people

# Drawn bottom-up: land use first, roads and POIs on top.
_DRAW_ORDER = (
    "farmland", "residential", "commercial_industrial", "green", "water_areas", "waterways",
    "buildings", "paths", "roads_minor", "roads_major", "rail", "pois",
)  # fmt: skip


def composite_rgb(tile: np.ndarray, background: tuple[int, int, int] = (250, 248, 242)) -> np.ndarray:
    """Blend the channel masks with their colours into an (H, W, 3) uint8 image."""
    by_name = {c.name: (i, c.colour) for i, c in enumerate(CHANNELS)}
    rgb = np.empty((*tile.shape[1:], 3), dtype=np.float32)
    rgb[:] = background
    for name in _DRAW_ORDER:
        i, colour = by_name[name]
        alpha = tile[i].astype(np.float32)[..., None] / 255.0
        rgb = rgb * (1 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    return rgb.clip(0, 255).astype(np.uint8)


def attributed_image(rgb: np.ndarray, scale: int = 4):
    """A PIL image of an RGB array, upscaled, with the ODbL attribution drawn in a corner."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 11)
    except OSError:
        font = ImageFont.load_default()
    x0, y0, x1, y1 = draw.textbbox((0, 0), ATTRIBUTION, font=font)
    w, h = x1 - x0, y1 - y0
    draw.rectangle((img.width - w - 8, img.height - h - 8, img.width, img.height), fill=(255, 255, 255))
    draw.text((img.width - w - 4, img.height - h - 6), ATTRIBUTION, fill=(40, 40, 40), font=font)
    return img


def write_preview(tile: np.ndarray, path: Path, scale: int = 4) -> Path:
    """Write the RGB composite of a tile as a PNG carrying "© OpenStreetMap contributors"."""
    with atomic_path(path) as tmp:
        attributed_image(composite_rgb(tile), scale).save(tmp, format="PNG")
    return path
