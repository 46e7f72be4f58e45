"""Geometry helpers shared by every stage: Web Mercator, great-circle distances, metre-sized boxes.

Two Earth radii on purpose: Web Mercator (EPSG:3857) is defined on a sphere of 6,378,137 m, so all
projection arithmetic uses EARTH_RADIUS_M; distances along the ground use the mean radius.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from loc2vec.core.errors import ConfigError

EARTH_RADIUS_M = 6378137.0  # Web Mercator sphere
MEAN_EARTH_RADIUS_M = 6371008.8  # great-circle distances


def mercator_scale(lat: float) -> float:
    """Web Mercator units per true metre at this latitude (1 / cos φ)."""
    return 1.0 / math.cos(math.radians(lat))


def lonlat_to_mercator(lon: float, lat: float) -> tuple[float, float]:
    """One point (degrees) → EPSG:3857 metres."""
    x = math.radians(lon) * EARTH_RADIUS_M
    y = math.log(math.tan(math.pi / 4 + math.radians(lat) / 2)) * EARTH_RADIUS_M
    return x, y


def to_mercator(lon: ArrayLike, lat: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Arrays of degrees → EPSG:3857 metres."""
    lon, lat = np.asarray(lon, float), np.asarray(lat, float)
    return np.radians(lon) * EARTH_RADIUS_M, np.log(np.tan(np.pi / 4 + np.radians(lat) / 2)) * EARTH_RADIUS_M


def from_mercator(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(lon, lat) in degrees of Web Mercator metres."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return np.degrees(x / EARTH_RADIUS_M), np.degrees(np.arctan(np.sinh(y / EARTH_RADIUS_M)))


def inner_bbox(bbox: tuple[float, float, float, float], margin_m: float) -> tuple[float, float, float, float]:
    """The bbox (west, south, east, north) shrunk by margin_m on every side (lon margin at the most poleward latitude)."""
    west, south, east, north = bbox
    dlat = math.degrees(margin_m / MEAN_EARTH_RADIUS_M)
    dlon = math.degrees(margin_m / (MEAN_EARTH_RADIUS_M * math.cos(math.radians(max(abs(south), abs(north))))))
    if west + dlon >= east - dlon or south + dlat >= north - dlat:
        raise ConfigError(f"region bbox {bbox} is smaller than two tile radii")
    return west + dlon, south + dlat, east - dlon, north - dlat


def unit_xyz(lat: ArrayLike, lon: ArrayLike) -> np.ndarray:
    """Points on the unit sphere: chord distances are monotone in great-circle distance, anywhere."""
    phi, lam = np.radians(np.asarray(lat, float)), np.radians(np.asarray(lon, float))
    return np.column_stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)])


def chord(distance_m: float) -> float:
    """The unit-sphere chord of a great-circle distance (for KD-tree radius queries on `unit_xyz`)."""
    return 2.0 * math.sin(distance_m / (2.0 * MEAN_EARTH_RADIUS_M))


def haversine_m(lat1: ArrayLike, lon1: ArrayLike, lat2: ArrayLike, lon2: ArrayLike) -> np.ndarray:
    """Great-circle distance in metres (broadcasting)."""
    p1, p2 = np.radians(np.asarray(lat1, float)), np.radians(np.asarray(lat2, float))
    dphi, dlam = p2 - p1, np.radians(np.asarray(lon2, float)) - np.radians(np.asarray(lon1, float))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlam / 2) ** 2
    return 2 * MEAN_EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def offset_m(lat: ArrayLike, lon: ArrayLike, north_m: ArrayLike, east_m: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Points moved north_m and east_m metres (a local flat approximation, fine below a few km)."""
    lat, lon = np.asarray(lat, float), np.asarray(lon, float)
    north_m, east_m = np.asarray(north_m, float), np.asarray(east_m, float)
    dlat = np.degrees(north_m / MEAN_EARTH_RADIUS_M)
    dlon = np.degrees(east_m / (MEAN_EARTH_RADIUS_M * np.cos(np.radians(lat))))
    return lat + dlat, lon + dlon
