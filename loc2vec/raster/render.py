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
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

import mapnik
import numpy as np

from loc2vec.core.config import RenderConfig
from loc2vec.core.errors import Loc2VecError
from loc2vec.core.geo import lonlat_to_mercator, mercator_scale
from loc2vec.core.names import validate_region_name
from loc2vec.osm.db import ConnInfo, ImportRecord, require_import
from loc2vec.raster.channels import CHANNEL_NAMES, CHANNELS, HIDE_VARIABLES, Channel, maskable_sql

log = logging.getLogger(__name__)
_WORLD_3857 = "-20037508.34,-20037508.34,20037508.34,20037508.34"
MAX_FEATURE_M = 16.0  # widest line (motorway) in channels.py


class RenderError(Loc2VecError, ValueError):
    """A tile cannot be rendered for these inputs (bad coordinates, outside the region, …)."""


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


def channel_map_xml(
    channel: Channel, schema: str, info: ConnInfo, px_per_m: float, buffer_px: int, size: int, maskable: bool = False
) -> str:
    """Mapnik XML for one channel: one layer from PostGIS, drawn white on transparent.

    `maskable` filters each OSM table by an id given per render (channels.maskable_sql, HiddenObject).
    """
    query = maskable_sql(channel) if maskable else channel.sql
    params = {
        "type": "postgis",
        "host": info.host,  # the wheel's libpq looks for sockets in /tmp: always explicit
        "port": str(info.port),
        "dbname": info.dbname,
        "user": info.user,
        "password": info.password or "",
        "table": f"({query.format(schema=_quote_ident(schema))}) AS t",
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
    validate_region_name(name)  # validated: only [a-z][a-z0-9_]*
    return f'"{name}"'


MAX_OSM_ID = 2**62  # far above any OSM id; anything larger (or not an int) is refused before it reaches SQL


@dataclass(frozen=True)
class HiddenObject:
    """One OSM object left out of a render (an evaluation label's own object), by its osm2pgsql id.

    Attributes:
        table: "point" (a node, planet_osm_point) or "way" (planet_osm_line/polygon: a way's id, or
            minus a relation's id, as osm2pgsql stores them).
        osm_id: the id in that table (validated: a non-zero int, so it is safe inside Mapnik's SQL).
        keep_channels: channels that still draw it (building_type keeps the footprint in `buildings`).
    """

    table: Literal["point", "way"]
    osm_id: int
    keep_channels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.table not in ("point", "way"):
            raise RenderError(f"hidden object table must be 'point' or 'way', got {self.table!r}")
        if isinstance(self.osm_id, bool) or not isinstance(self.osm_id, int | np.integer):
            raise RenderError(f"hidden object id must be an integer, got {self.osm_id!r}")
        if not 0 < abs(int(self.osm_id)) < MAX_OSM_ID:
            raise RenderError(f"hidden object id must be a non-zero OSM id, got {self.osm_id!r}")
        object.__setattr__(self, "osm_id", int(self.osm_id))
        unknown = [c for c in self.keep_channels if c not in CHANNEL_NAMES]
        if unknown:
            raise RenderError(f"unknown channels {unknown} in keep_channels")

    def variables(self, channel: str) -> dict[str, int]:
        """Mapnik render variables hiding this object from `channel` (0 hides nothing)."""
        hide = 0 if channel in self.keep_channels else self.osm_id
        return {
            var: hide if (table == "planet_osm_point") == (self.table == "point") else 0
            for table, var in HIDE_VARIABLES.items()
        }


NOTHING_HIDDEN: dict[str, int] = dict.fromkeys(HIDE_VARIABLES.values(), 0)


@dataclass(frozen=True)
class TileSpec:
    radius_m: float
    size: int

    @property
    def metres_per_pixel(self) -> float:
        return 2.0 * self.radius_m / self.size


class TileRenderer:
    """The 12 channel maps of one region, built once; renders tiles on demand (one per process)."""

    def __init__(self, region: str, spec: TileSpec, info: ConnInfo, buffer_px: int, maskable: bool = False):
        self.region = validate_region_name(region)
        self.maskable = maskable
        self.spec = spec
        self.info = info
        self.record: ImportRecord = require_import(region, self.info)
        px_per_m = 1.0 / spec.metres_per_pixel
        buffer_px = max(buffer_px, min_buffer_px(spec.size, MAX_FEATURE_M * px_per_m))
        self._maps: list[mapnik.Map] = []
        for channel in CHANNELS:
            m = mapnik.Map(spec.size, spec.size)
            xml = channel_map_xml(channel, region, self.info, px_per_m, buffer_px, spec.size, maskable)
            mapnik.load_map_from_string(m, xml)
            self._maps.append(m)
        self._image = mapnik.Image(spec.size, spec.size)
        self._lock = threading.Lock()  # Mapnik maps are not thread-safe; processes scale, threads don't

    def render(
        self,
        lat: float,
        lon: float,
        angle_deg: float = 0.0,
        shift_m: tuple[float, float] = (0.0, 0.0),
        hidden: HiddenObject | None = None,
    ) -> np.ndarray:
        """The (12, size, size) uint8 tile; `hidden` (maskable renderers only) is left out of it."""
        if hidden is not None and not self.maskable:
            raise RenderError("this renderer cannot hide objects: get_renderer(..., maskable=True)")
        size = self.spec.size
        k = mercator_scale(lat)
        x, y = lonlat_to_mercator(lon, lat)
        x, y, r = x + shift_m[0] * k, y + shift_m[1] * k, self.spec.radius_m * k
        box = mapnik.Box2d(x - r, y - r, x + r, y + r)
        out = np.empty((len(self._maps), size, size), dtype=np.uint8)
        with self._lock:
            for i, m in enumerate(self._maps):
                variables: dict[str, float | int] = {"angle": float(angle_deg)}
                if self.maskable:
                    variables.update(hidden.variables(CHANNELS[i].name) if hidden else NOTHING_HIDDEN)
                m.zoom_to_box(box)
                self._image.clear()
                mapnik.render_with_vars(m, self._image, variables)
                rgba = np.frombuffer(self._image.to_string(), dtype=np.uint8).reshape(size, size, 4)
                out[i] = rgba[..., 3]
        return out


_RENDERERS: dict[tuple, TileRenderer] = {}


def get_renderer(region: str, render: RenderConfig, info: ConnInfo, maskable: bool = False) -> TileRenderer:
    """The per-process renderer for a region and tile geometry (maps are parsed once, then reused).

    `maskable` renderers can leave one OSM object out of each render (HiddenObject); the pipeline's are not.
    """
    spec = TileSpec(radius_m=float(render.radius_m), size=int(render.size))
    key = (os.getpid(), region, spec, render.buffer_px, info, maskable)
    renderer = _RENDERERS.get(key)
    if renderer is None:
        renderer = _RENDERERS[key] = TileRenderer(region, spec, info, render.buffer_px, maskable)
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
    render: RenderConfig,
    info: ConnInfo,
    angle_deg: float = 0.0,
    shift_m: tuple[float, float] = (0.0, 0.0),
    hidden: HiddenObject | None = None,
) -> np.ndarray:
    """Render the (12, size, size) uint8 tile around (lat, lon), rotated CCW by angle_deg and with
    its centre moved shift_m = (east, north) metres, from the region's PostGIS import; `hidden` is
    left out of it (evaluation's masked scenes).

    The tile geometry is `render` (params.render: what training and embedding see). The moved centre
    must stay inside the region's extent: a tile of nothing is an error, not an empty array.
    """
    validate_location(lat, lon)
    if not all(math.isfinite(v) for v in (angle_deg, *shift_m)):
        raise RenderError(f"angle and shift must be finite, got angle={angle_deg}, shift={shift_m}")
    renderer = get_renderer(region, render, info, maskable=hidden is not None)
    validate_location(lat, lon, renderer.record)
    if shift_m != (0.0, 0.0):
        from loc2vec.core.geo import offset_m

        moved = offset_m(lat, lon, float(shift_m[1]), float(shift_m[0]))
        try:
            validate_location(float(moved[0]), float(moved[1]), renderer.record)
        except RenderError as exc:
            shift = tuple(float(v) for v in shift_m)
            raise RenderError(f"the shift {shift} m moves the tile centre out of the region: {exc}") from None
    return renderer.render(lat, lon, angle_deg, (float(shift_m[0]), float(shift_m[1])), hidden)
