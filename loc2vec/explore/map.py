"""The PCA map (article figures 18–19): embeddings → 3 principal components → RGB, drawn over the region.

Offline by construction: the base layer is rendered by Mapnik from our own PostGIS import (the 12 channels,
composited with their preview colours, line widths in true metres) and the interactive map is Leaflet 1.9.3
(BSD-2-Clause, vendored in loc2vec/static/leaflet) inlined into the page, with two image overlays: no tile
server, no CDN. Both images are in Web Mercator pixels, so Leaflet's image overlays place them exactly.
"""

from __future__ import annotations

import base64
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from loc2vec.core.geo import EARTH_RADIUS_M
from loc2vec.explore.space import Space
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.preview import ATTRIBUTION, composite_rgb, font

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True)
class MapGrid:
    """A Web Mercator pixel grid over a lat/lon box: x0, y1 is the top-left corner, `upp` units per pixel."""

    x0: float
    y1: float
    upp: float
    width: int
    height: int

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(south, west, north, east) in degrees of the grid's outer edges."""
        west, north = _lonlat(self.x0, self.y1)
        east, south = _lonlat(self.x0 + self.width * self.upp, self.y1 - self.height * self.upp)
        return south, west, north, east

    def pixels(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = _mercator(np.asarray(lon, float), np.asarray(lat, float))
        return (x - self.x0) / self.upp, (self.y1 - y) / self.upp


def _mercator(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.radians(lon) * EARTH_RADIUS_M, np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * EARTH_RADIUS_M


def _lonlat(x: float, y: float) -> tuple[float, float]:
    return math.degrees(x / EARTH_RADIUS_M), math.degrees(math.atan(math.sinh(y / EARTH_RADIUS_M)))


def map_grid(space: Space, m_per_px: float, max_px: int, margin_m: float = 150.0) -> MapGrid:
    """The grid over the embedded cells plus a margin, at m_per_px true metres (coarser if it exceeds max_px)."""
    lat_c = float(np.mean([space.lat.min(), space.lat.max()]))
    k = 1.0 / math.cos(math.radians(lat_c))  # Mercator units per true metre here
    x, y = _mercator(space.lon, space.lat)
    x0, x1 = x.min() - margin_m * k, x.max() + margin_m * k
    y0, y1 = y.min() - margin_m * k, y.max() + margin_m * k
    upp = max(m_per_px * k, max(x1 - x0, y1 - y0) / max_px)
    return MapGrid(
        x0=float(x0),
        y1=float(y1),
        upp=float(upp),
        width=int(math.ceil((x1 - x0) / upp)),
        height=int(math.ceil((y1 - y0) / upp)),
    )


def render_base(region: str, grid: MapGrid, info: ConnInfo) -> np.ndarray:
    """(H, W, 3) uint8: the region's 12 channels rendered by Mapnik over the grid and composited."""
    import mapnik

    from loc2vec.raster.channels import CHANNELS
    from loc2vec.raster.render import channel_map_xml

    lat_c = (grid.bounds[0] + grid.bounds[2]) / 2
    px_per_m = math.cos(math.radians(lat_c)) / grid.upp  # true metres → pixels (line widths are in metres)
    box = mapnik.Box2d(grid.x0, grid.y1 - grid.height * grid.upp, grid.x0 + grid.width * grid.upp, grid.y1)
    masks = np.empty((len(CHANNELS), grid.height, grid.width), dtype=np.uint8)
    image = mapnik.Image(grid.width, grid.height)
    for i, channel in enumerate(CHANNELS):
        m = mapnik.Map(grid.width, grid.height)
        mapnik.load_map_from_string(m, channel_map_xml(channel, region, info, px_per_m, 16, grid.width))
        m.zoom_to_box(box)
        image.clear()
        mapnik.render_with_vars(m, image, {"angle": 0.0})
        rgba = np.frombuffer(image.to_string(), dtype=np.uint8).reshape(grid.height, grid.width, 4)
        masks[i] = rgba[..., 3]
    return composite_rgb(masks)


def pca_overlay(space: Space, grid: MapGrid) -> Image.Image:
    """RGBA image: each embedded cell's hexagon filled with its PCA colour, transparent elsewhere."""
    import h3

    img = Image.new("RGBA", (grid.width, grid.height), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    colours = (space.rgb * 255).round().astype(np.uint8)
    for cell, (r, g, b) in zip(space.h3_cell, colours.tolist(), strict=True):
        ring = np.asarray(h3.cell_to_boundary(cell))
        px, py = grid.pixels(ring[:, 0], ring[:, 1])
        draw.polygon(list(zip(px.tolist(), py.tolist(), strict=True)), fill=(r, g, b, 255))
    return img


def static_map(base: np.ndarray, overlay: Image.Image, opacity: float, title: str, subtitle: str) -> Image.Image:
    """The PNG figure: base lightened, PCA colours on top, a title bar and the attribution."""
    light = Image.fromarray(((base.astype(np.float32) * 0.6) + 255 * 0.4).astype(np.uint8)).convert("RGBA")
    alpha = np.asarray(overlay)[..., 3].astype(np.float32) * opacity
    over = overlay.copy()
    over.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    body = Image.alpha_composite(light, over).convert("RGB")
    head, foot = 46, 20
    sheet = Image.new("RGB", (body.width, body.height + head + foot), "white")
    sheet.paste(body, (0, head))
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 4), title, fill=(0, 0, 0), font=font(16))
    draw.text((8, 25), subtitle, fill=(60, 60, 60), font=font(12))
    draw.text((8, sheet.height - foot + 3), ATTRIBUTION, fill=(60, 60, 60), font=font(12))
    return sheet


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def leaflet_assets() -> tuple[str, str]:
    """(css, js) of the vendored Leaflet, CSS images inlined as data URIs (nothing is fetched)."""
    root = STATIC / "leaflet"
    css = (root / "leaflet.css").read_text()
    css = re.sub(r"url\((images/[\w.-]+\.png)\)", lambda m: f"url({_data_uri(root / m.group(1))})", css)
    return css, (root / "leaflet.js").read_text()


def leaflet_map(grid: MapGrid, base_png: str, overlay_png: str, opacity: float, height_px: int = 720) -> str:
    """HTML of the interactive map (inline Leaflet): base and PCA overlays, opacity slider, attribution.

    Sets window.loc2vecMapReady once both images have loaded (the browser test waits for it)."""
    css, js = leaflet_assets()
    south, west, north, east = grid.bounds
    config = {
        "bounds": [[south, west], [north, east]],
        "base": base_png,
        "overlay": overlay_png,
        "opacity": opacity,
        "attribution": ATTRIBUTION,
    }
    return f"""<style>{css}</style>
<div class="map-tools"><label>PCA colours opacity <input id="opacity" type="range" min="0" max="1" step="0.05"
 value="{opacity}"></label> <code id="clicked">click the map for a location's loc2vec similar command</code></div>
<div id="map" style="height:{height_px}px"></div>
<script>{js}</script>
<script>
(function () {{
  const cfg = {json.dumps(config)};
  const map = L.map("map", {{zoomSnap: 0.25, attributionControl: true}});
  map.attributionControl.setPrefix("Leaflet");
  let loaded = 0;
  const ready = () => {{ if (++loaded === 2) window.loc2vecMapReady = true; }};
  const fail = (e) => console.error("map image failed to load: " + e.target.src);
  const base = L.imageOverlay(cfg.base, cfg.bounds, {{alt: "base map", attribution: cfg.attribution}})
    .on("load", ready).on("error", fail).addTo(map);
  const pca = L.imageOverlay(cfg.overlay, cfg.bounds, {{alt: "PCA colours", opacity: cfg.opacity}})
    .on("load", ready).on("error", fail).addTo(map);
  // the control numbers overlays' z-index in this order: the PCA colours go on top of the base map
  L.control.layers(null, {{"base map (OSM data)": base, "PCA colours": pca}}, {{collapsed: false}}).addTo(map);
  L.control.scale({{imperial: false}}).addTo(map);
  map.fitBounds(cfg.bounds);
  map.setMaxBounds(L.latLngBounds(cfg.bounds).pad(0.5));
  document.getElementById("opacity").addEventListener("input", (e) => pca.setOpacity(+e.target.value));
  map.on("click", (e) => {{
    const lat = e.latlng.lat.toFixed(5), lon = e.latlng.lng.toFixed(5);
    document.getElementById("clicked").textContent = "loc2vec similar --lat " + lat + " --lon " + lon;
  }});
}})();
</script>"""
