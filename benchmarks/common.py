"""Shared helpers for benchmarks: deterministic locations where there is something to draw, latencies."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.core.names import check_region_name
from loc2vec.osm.db import cursor


def bench_region(project: Project, region: str | None) -> str:
    """The region to benchmark: the one given (validated), else params regions.default."""
    return check_region_name(region or project.params.regions.default, project.params.reserved_schemas)


def bench_locations(project: Project, region: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n (lat, lon) points on buildings and roads of the region, the same for the same seed."""
    check_region_name(region, project.params.reserved_schemas)
    query = sql.SQL(
        """SELECT ST_Y(p), ST_X(p) FROM (
             SELECT ST_Transform(ST_PointOnSurface(way), 4326) AS p, md5(osm_id::text || %s) AS h
               FROM {schema}.planet_osm_polygon WHERE building IS NOT NULL
             UNION ALL
             SELECT ST_Transform(ST_LineInterpolatePoint(ST_LineMerge(way), 0.5), 4326),
                    md5(osm_id::text || %s)
               FROM {schema}.planet_osm_line WHERE highway IS NOT NULL AND ST_GeometryType(way) = 'ST_LineString'
           ) q ORDER BY h LIMIT %s"""
    ).format(schema=sql.Identifier(region))
    with cursor(project.info) as cur:
        cur.execute(query, (str(seed), str(seed), n))
        rows = np.asarray(cur.fetchall(), dtype=np.float64)
    if len(rows) == 0:
        raise ValueError(f"region {region!r} has no buildings or roads to benchmark on")
    return rows[:, 0], rows[:, 1]


def latencies(fn: Callable, requests: list, warmup: int) -> dict[str, float]:
    """p50/p99 wall milliseconds of fn(r) over the requests, after `warmup` untimed calls."""
    for r in requests[:warmup]:
        fn(r)
    times = []
    for r in requests:
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 3),
        "p99_ms": round(float(np.percentile(ms, 99)), 3),
        "n": len(ms),
    }
