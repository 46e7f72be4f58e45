"""Which model versions a store serves on their own, and their offline files.

Every published model version N keeps its rows in the offline Parquet (the history point-in-time joins
need), and while it is *served* it also has a feature view of its own, `location_embedding_vN`, over a file
holding only its rows, with feature services pinned to it (`transport_mode_vN`, `venue_vN`). A version is
served until `publish.retain_versions` newer versions are published: then it is *retired* (its view, its
services, its online rows and its file go; its offline history stays).

Why one view per version, not Feast's feature view versioning (alpha in 0.67): Feast numbers a view's
*definition* changes (schema, UDF), automatically, from v0; our versions are MLflow's, of the *data*
(same schema, other vectors). A view per version over its own file keeps MLflow's number in the name
consumers pin, and its online table is written only from that version's rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loc2vec.core.errors import Loc2VecError
from loc2vec.core.names import validate_model_version
from loc2vec.embedding.store import SCHEMA, write_parquet_atomic
from loc2vec.serving.view_names import pinned_view, version_key

log = logging.getLogger(__name__)


class VersionError(Loc2VecError, ValueError):
    """The offline data cannot be served by version (a version at two resolutions, or a version number that
    pinned consumers know as another model's)."""


@dataclass(frozen=True)
class ServedVersion:
    """One model version served on its own: its name, resolution and rows (all its offline rows)."""

    version: str
    model_name: str
    h3_resolution: int
    rows: pa.Table | None = None  # None when served from partition records (serving/offline.py)

    @property
    def view(self) -> str:
        """Its feature view's name."""
        return pinned_view(self.version)

    @property
    def tags(self) -> dict[str, str]:
        """What a client reads from the registry to look the version up (feature view tags are strings)."""
        return {"model_name": self.model_name, "h3_resolution": str(self.h3_resolution)}


def _one(table: pa.Table, column: str, version: str) -> str:
    values = sorted({str(v) for v in table.column(column).unique().to_pylist()})
    if len(values) != 1:
        raise VersionError(
            f"model version {version} appears with {column} {values} in the offline data: a pinned version "
            "has one H3 resolution (re-embed the regions with one embed.h3_resolution)"
        )
    return values[0]


def check_same_models(served: list[ServedVersion], previous: dict[str, str]) -> None:
    """Refuse to serve a version number that the store served as another model's: consumers pinned to it
    would silently receive another model's vectors.

    Raises:
        VersionError: a served version's model name differs from the one recorded for it.
    """
    for v in served:
        before = previous.get(v.version)
        if before is not None and before != v.model_name:
            raise VersionError(
                f"version {v.version} of {v.model_name!r} would replace version {v.version} of {before!r} under "
                f"{v.view}: consumers pinned to it would silently get another model. Publish {v.model_name!r} to "
                "another store (another data/feast, online store or project), or retire the old versions first"
            )


def served_versions(table: pa.Table, retain: int) -> tuple[list[ServedVersion], list[str]]:
    """The newest `retain` versions of the current model (the model of the newest row), oldest first, and
    that model's older versions (retired). Other registered models' rows stay in the offline history and
    the latest view, with no pinned view: version numbers name one model's versions only.

    Raises:
        VersionError: a version's rows have two H3 resolutions.
    """
    if table.num_rows == 0:
        return [], []
    newest = table.take(
        [int(pc.index(table.column("event_timestamp"), pc.max(table.column("event_timestamp"))).as_py())]
    )
    model = str(newest.column("model_name")[0].as_py())
    rows = table.filter(pc.equal(table.column("model_name"), model))
    versions = sorted({str(v) for v in rows.column("model_version").unique().to_pylist()}, key=version_key)
    for v in versions:
        validate_model_version(v)
    keep, retired = versions[-retain:], versions[:-retain]
    served = []
    column = rows.column("model_version")
    for v in keep:
        mine = rows.filter(pc.equal(column, v))
        served.append(ServedVersion(v, model, int(_one(mine, "h3_resolution", v)), mine))
    return served, retired


def served_partitions(parts: list, retain: int) -> tuple[list[ServedVersion], list[str]]:
    """`served_versions` from partition records (serving/offline.py Partition) instead of rows: the newest
    partition's model, its newest `retain` versions (oldest first) and its older ones.

    Raises:
        VersionError: a version's partitions have two H3 resolutions.
    """
    if not parts:
        return [], []
    model = max(parts, key=lambda p: (p.event_timestamp, p.key)).model_name
    mine = [p for p in parts if p.model_name == model]
    versions = sorted({p.model_version for p in mine}, key=version_key)
    for v in versions:
        validate_model_version(v)
    keep, retired = versions[-retain:], versions[:-retain]
    served = []
    for v in keep:
        resolutions = sorted({r for p in mine if p.model_version == v for r in p.resolutions})
        if len(resolutions) != 1:
            raise VersionError(
                f"model version {v} appears with h3_resolution {[str(r) for r in resolutions]} in the offline data: "
                "a pinned version has one H3 resolution (re-embed the regions with one embed.h3_resolution)"
            )
        served.append(ServedVersion(v, model, resolutions[0]))
    return served, retired


def write_version_file(path: Path, rows: pa.Table) -> bool:
    """Write one version's offline file (atomically), only if its content changes; returns whether it did."""
    rows = rows.cast(SCHEMA).combine_chunks()
    if path.is_file():
        try:
            if pq.read_table(path).cast(SCHEMA).equals(rows):
                return False
        except (OSError, pa.ArrowInvalid):  # unreadable: rewrite it
            log.warning("unreadable version file %s: rewriting it", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(rows, path)
    return True
