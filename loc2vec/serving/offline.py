"""The offline store as one Parquet file per partition, so that a publish reads and writes only what changed.

A partition is (region, model_name, model_version, event_timestamp) (PARTITION): the rows one `loc2vec embed`
of one region with one model version brings. Layout under data/feast/:

* ``partitions/<id>-<digest>.parquet``: each partition's rows as the region's embeddings file brought them
  (its *input*), named by content: written once, never rewritten, read back only when a later partition
  shares cells with it (see `overlapping`).
* ``offline/<generation>/all/`` and ``offline/<generation>/v<N>/``: what Feast reads, one hard link per
  partition (a filtered copy where a partition loses tied rows, below). A generation is named by the digest
  of its listing, so its name is the content digest of the whole offline store.
* ``embeddings.parquet`` → ``offline/<generation>/all`` and ``versions/embeddings_v<N>.parquet`` →
  ``../offline/<generation>/v<N>``: symbolic links, swapped with one ``os.replace`` each: readers of the
  FileSources (point-in-time joins, the similar index) see one generation whole, never a half-written one.
  ``pq.read_table`` and ``pd.read_parquet`` read such a directory like the single file it replaces.

Why this layout and not Feast's PostgreSQL offline store: measured on 89,492 Liechtenstein cells, the
PostgreSQL offline store would still have to copy every row into a table (COPY of 16-float arrays) and its
point-in-time joins then run in the database; a partition file is one zstd Parquet write (0.1–0.2 s for
the region) and Feast's file offline store reads a directory of them as it read the one file. The cost that
made publish slow was Feast re-reading all of history once per feature view during materialization; publish
no longer materializes (serving/online_write.py), so the offline store is read only for point-in-time
joins, and a partitioned directory serves those unchanged.

Ties: Feast's point-in-time join breaks ties on event_timestamp arbitrarily, so of the rows of one cell with
one event_timestamp (overlapping regions embedded with one model) only the first in (region, model_name,
model_version) order is visible; the others stay in the partition's input file and come back if the winner
goes. A partition that loses rows is linked as a filtered copy (its ``hidden`` digest names it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loc2vec.core.atomic import write_text
from loc2vec.core.paths import ProjectPaths
from loc2vec.embedding.store import SCHEMA, write_parquet_atomic

log = logging.getLogger(__name__)

PARTITION = ("region", "model_name", "model_version", "event_timestamp")
PARENT_RESOLUTION = 5  # ~250 km² H3 cells: which partitions may share cells (`overlapping`)
TIE_ORDER = ("region", "model_name", "model_version")  # the first of tied rows is the visible one
KEEP_GENERATIONS = 2  # the current one and the one before (a reader may still be listing it)


# ---------------------------------------------------------------- digests


def _hash_array(h: Any, arr: pa.Array | pa.ChunkedArray) -> None:
    """Feed an array's values into h in a canonical form: independent of chunks, slices and buffer layout."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    h.update(str(arr.type).encode() + b"\0" + len(arr).to_bytes(8, "little"))
    h.update(np.packbits(arr.is_null().to_numpy(zero_copy_only=False)).tobytes())
    typ = arr.type
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        h.update(pc.list_value_length(arr).fill_null(0).to_numpy().astype("<i8").tobytes())
        _hash_array(h, arr.flatten())  # the values of the non-null lists, in order
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        arr = arr.fill_null("")
        h.update(pc.binary_length(arr).to_numpy().astype("<i8").tobytes())
        joined = pc.binary_join(pa.ListArray.from_arrays(pa.array([0, len(arr)], pa.int32()), arr), "")[0]
        h.update(joined.as_buffer() or b"")
    else:
        if pa.types.is_timestamp(typ):
            arr = arr.cast(pa.int64())
        h.update(np.ascontiguousarray(arr.fill_null(0).to_numpy(zero_copy_only=False)).tobytes())


def h3_parents(cells: pa.Array | pa.ChunkedArray | Iterable[str], resolution: int = PARENT_RESOLUTION) -> list[str]:
    """The distinct parents at `resolution` of H3 cells (a cell coarser than that is its own), sorted.

    Bit arithmetic on the 64-bit index (resolution in bits 52–55, one 3-bit digit per finer resolution,
    unused digits 7), vectorised: 30 ms for 90k cells where h3.cell_to_parent takes ten times that."""
    values = cells.to_pylist() if isinstance(cells, pa.Array | pa.ChunkedArray) else list(cells)
    if not values:
        return []
    v = np.fromiter((int(c, 16) for c in values), dtype=np.uint64, count=len(values))
    res = (v >> np.uint64(52)) & np.uint64(0xF)
    coarse = res > resolution
    p = np.uint64(resolution)
    parent = (v & ~np.uint64(0xF << 52)) | (p << np.uint64(52)) | np.uint64((1 << ((15 - resolution) * 3)) - 1)
    out = np.unique(np.where(coarse, parent, v))
    return [f"{int(x):x}" for x in out]


@dataclass(frozen=True)
class Partition:
    """One partition's record (what the publish state keeps): its key, size, digests and where its cells are.

    Attributes:
        key: (region, model_name, model_version, event_timestamp as UTC ISO text).
        rows: rows of its input.
        cells_digest: digest of its cells; digest: of its whole input content (rows in cell order).
        resolutions: the H3 resolutions of its cells.
        parents: its cells' parents at PARENT_RESOLUTION (partitions without a common parent share no cell).
        hidden: digest of its rows that lose a tie (not visible to Feast), "" when none.
    """

    key: tuple[str, ...]
    rows: int
    cells_digest: str
    digest: str
    resolutions: tuple[int, ...]
    parents: tuple[str, ...]
    hidden: str = ""

    @property
    def id(self) -> str:
        """Its file-name stem: a digest of its key."""
        return hashlib.sha256("\0".join(self.key).encode()).hexdigest()[:16]

    @property
    def file_name(self) -> str:
        """Its input file: named by content, so an existing file is never rewritten."""
        return f"{self.id}-{self.digest[:16]}.parquet"

    @property
    def visible_name(self) -> str:
        """What Feast reads of it: the input itself, or a copy without the tie-losing rows."""
        return self.file_name if not self.hidden else f"{self.id}-{self.digest[:16]}-{self.hidden[:12]}.parquet"

    @property
    def region(self) -> str:
        """Its region."""
        return self.key[0]

    @property
    def model_name(self) -> str:
        """Its registered model."""
        return self.key[1]

    @property
    def model_version(self) -> str:
        """Its model version."""
        return self.key[2]

    @property
    def event_timestamp(self) -> str:
        """Its event timestamp (UTC ISO text)."""
        return self.key[3]

    def record(self) -> dict[str, Any]:
        """What the publish state keeps of it (JSON)."""
        return {
            **dict(zip(PARTITION, self.key, strict=True)),
            "rows": self.rows,
            "cells_digest": self.cells_digest,
            "digest": self.digest,
            "resolutions": list(self.resolutions),
            "parents": list(self.parents),
            "hidden": self.hidden,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Partition:
        """The partition a state record describes."""
        return cls(
            tuple(r[c] for c in PARTITION),
            int(r["rows"]),
            r["cells_digest"],
            r["digest"],
            tuple(r["resolutions"]),
            tuple(r["parents"]),
            r.get("hidden", ""),
        )

    def shares_parents(self, other: Partition) -> bool:
        """Whether it and `other` may share a cell."""
        return not set(self.parents).isdisjoint(other.parents)


def partition_key(row: dict[str, Any]) -> tuple[str, ...]:
    """A partition's key from a row with its PARTITION columns."""
    return (*(str(row[c]) for c in PARTITION[:-1]), row["event_timestamp"].astimezone(UTC).isoformat())


def split(table: pa.Table) -> dict[tuple[str, ...], tuple[Partition, pa.Table]]:
    """A table of embeddings → its partitions, each with its rows in h3_cell order (one row per cell: the last
    of duplicates), records and digests. Vectorised digests: ~1 s for 850k rows."""
    table = table.cast(SCHEMA)
    keys = [(c, "ascending") for c in PARTITION]
    ordered = table.sort_by([*keys, ("h3_cell", "ascending")])
    groups = ordered.group_by(list(PARTITION), use_threads=False).aggregate([([], "count_all")]).sort_by(keys)
    columns = [c for c in ordered.column_names if c not in PARTITION]
    out: dict[tuple[str, ...], tuple[Partition, pa.Table]] = {}
    offset = 0
    for group in groups.to_pylist():
        n = group["count_all"]
        part = ordered.slice(offset, n).combine_chunks()
        offset += n
        cell = part.column("h3_cell").to_numpy(zero_copy_only=False)
        if len(cell) > 1 and (cell[1:] == cell[:-1]).any():  # one row per cell and partition
            last = np.ones(len(cell), dtype=bool)
            last[:-1] = cell[1:] != cell[:-1]
            part = part.filter(pa.array(last))
        cells, content = hashlib.sha256(), hashlib.sha256()
        _hash_array(cells, part.column("h3_cell"))
        for name in columns:
            content.update(name.encode() + b"\0")
            _hash_array(content, part.column(name))
        resolutions = tuple(sorted(int(r) for r in pc.unique(part.column("h3_resolution")).to_pylist()))
        record = Partition(
            partition_key(group),
            part.num_rows,
            cells.hexdigest(),
            content.hexdigest(),
            resolutions,
            tuple(h3_parents(part.column("h3_cell"))),
        )
        out[record.key] = (record, part)
    return out


# ---------------------------------------------------------------- ties and the latest rows


def resolve_ties(tables: dict[tuple[str, ...], pa.Table]) -> tuple[pa.Table, dict[tuple[str, ...], np.ndarray]]:
    """The visible rows of a set of partitions (one row per (h3_cell, event_timestamp): the first in TIE_ORDER),
    with a `_part` column (index into sorted(tables)), and per partition the mask of its rows that lose."""
    keys = sorted(tables)
    if not keys:
        return SCHEMA.empty_table().append_column("_part", pa.array([], pa.int32())), {}
    parts = [
        tables[k].cast(SCHEMA).append_column("_part", pa.array(np.full(tables[k].num_rows, i, np.int32)))
        for i, k in enumerate(keys)
    ]
    parts = [p.append_column("_row", pa.array(np.arange(p.num_rows, dtype=np.int64))) for p in parts]
    merged = pa.concat_tables(parts).combine_chunks()
    order = [("h3_cell", "ascending"), ("event_timestamp", "ascending")] + [(c, "ascending") for c in TIE_ORDER]
    merged = merged.sort_by(order)
    cell = merged.column("h3_cell").to_numpy(zero_copy_only=False)
    ts = merged.column("event_timestamp").cast(pa.int64()).to_numpy()
    first = np.ones(len(cell), dtype=bool)
    first[1:] = (cell[1:] != cell[:-1]) | (ts[1:] != ts[:-1])
    losers: dict[tuple[str, ...], np.ndarray] = {k: np.zeros(tables[k].num_rows, dtype=bool) for k in keys}
    if not first.all():
        part_idx = merged.column("_part").to_numpy()[~first]
        rows = merged.column("_row").to_numpy()[~first]
        for i, r in zip(part_idx.tolist(), rows.tolist(), strict=True):
            losers[keys[i]][r] = True
    visible = merged.filter(pa.array(first)).drop_columns(["_row"])
    return visible, losers


def latest_per_cell(rows: pa.Table) -> pa.Table:
    """The row with the latest event_timestamp per cell (rows free of ties, e.g. `resolve_ties`' visible ones)."""
    ordered = rows.sort_by([("h3_cell", "ascending"), ("event_timestamp", "descending")])
    cell = ordered.column("h3_cell").to_numpy(zero_copy_only=False)
    first = np.ones(len(cell), dtype=bool)
    first[1:] = cell[1:] != cell[:-1]
    return ordered.filter(pa.array(first))


def latest_of_sorted(rows: pa.Table) -> pa.Table:
    """`latest_per_cell` of rows already sorted by (h3_cell, event_timestamp) ascending and free of ties, as
    `resolve_ties`' visible rows and any filter of them are: the last row of each cell, without sorting the
    table again (a sort moves every column, embeddings included; measured the largest pyarrow cost of a full
    publish). The same rows in the same order (cells ascending)."""
    cell = rows.column("h3_cell").to_numpy(zero_copy_only=False)
    last = np.ones(len(cell), dtype=bool)
    last[:-1] = cell[:-1] != cell[1:]
    return rows.filter(pa.array(last))


def hidden_digest(cells: pa.Array) -> str:
    """A digest of the cells of tie-losing rows ("" when none)."""
    if len(cells) == 0:
        return ""
    h = hashlib.sha256()
    _hash_array(h, cells)
    return h.hexdigest()


def overlapping(changed: Iterable[Partition], others: Iterable[Partition]) -> list[Partition]:
    """The partitions of `others` that may share a cell with a changed one (a common parent cell): the only
    ones an incremental publish reads."""
    changed = list(changed)
    return [o for o in others if any(o.shares_parents(c) for c in changed)]


# ---------------------------------------------------------------- the files


class OfflineLayout:
    """The partition files and generations under data/feast (see the module docstring)."""

    def __init__(self, paths: ProjectPaths) -> None:
        self.paths = paths
        self.root = paths.feast
        self.parts_dir = self.root / "partitions"
        self.gens_dir = self.root / "offline"

    @property
    def catalog_path(self) -> Path:
        """The offline partitions' records, shared by every online store (each store's publish state records
        which of them it serves)."""
        return self.root / "partitions.json"

    def read_catalog(self) -> dict[tuple[str, ...], Partition] | None:
        """The partitions the offline store holds, or None when it has no catalog yet."""
        if not self.catalog_path.is_file():
            return None
        return {(p := Partition.from_record(r)).key: p for r in json.loads(self.catalog_path.read_text())}

    def write_catalog(self, parts: Iterable[Partition]) -> None:
        """Record the offline partitions (atomically), after their files and generation are in place."""
        records = [p.record() for p in sorted(parts, key=lambda p: p.key)]
        write_text(self.catalog_path, json.dumps(records, indent=1, sort_keys=True))

    @property
    def source(self) -> Path:
        """The latest views' FileSource (a link to the current generation's `all`)."""
        return self.paths.offline_store

    def version_source(self, version: str) -> Path:
        """A served version's FileSource (a link to its directory in the current generation)."""
        return self.paths.version_offline_store(version)

    def legacy(self) -> bool:
        """An offline store of the single-file layout (an older loc2vec's)."""
        return self.source.is_file() and not self.source.is_symlink()

    def read_legacy(self) -> pa.Table:
        """The single offline file of the older layout."""
        return pq.read_table(self.source).cast(SCHEMA)

    def input_path(self, part: Partition) -> Path:
        """Where a partition's input file is."""
        return self.parts_dir / part.file_name

    def has_input(self, part: Partition) -> bool:
        """Whether a partition's files are on disk (its input, and its filtered copy if it has one)."""
        return self.input_path(part).is_file() and (self.parts_dir / part.visible_name).is_file()

    def write_input(self, part: Partition, table: pa.Table) -> bool:
        """Write a partition's input file unless it exists (its name is its content); returns whether it did."""
        path = self.input_path(part)
        if path.is_file():
            return False
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        write_parquet_atomic(table.cast(SCHEMA), path)
        return True

    def read(self, part: Partition) -> pa.Table:
        """A partition's input rows."""
        return pq.read_table(self.input_path(part)).cast(SCHEMA)

    def write_visible(self, part: Partition, table: pa.Table) -> None:
        """A partition's rows without those that lose a tie, when it has some (`part.hidden`)."""
        path = self.parts_dir / part.visible_name
        if part.hidden and not path.is_file():
            write_parquet_atomic(table.cast(SCHEMA), path)

    def generation(self, parts: Iterable[Partition], versions: dict[str, list[Partition]]) -> str:
        """Make (if new) the generation of these partitions, with a directory per served version; its name."""
        parts = sorted(parts, key=lambda p: p.key)
        listing = [p.visible_name for p in parts] + [
            f"v{v}:{p.visible_name}" for v, ps in sorted(versions.items()) for p in sorted(ps, key=lambda p: p.key)
        ]
        name = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:20]
        final = self.gens_dir / name
        if final.is_dir():
            return name
        self.gens_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.gens_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for sub, members in [("all", parts), *((f"v{v}", ps) for v, ps in sorted(versions.items()))]:
            (tmp / sub).mkdir(parents=True)
            for p in members:
                _link(self.parts_dir / p.visible_name, tmp / sub / p.visible_name)
        tmp.rename(final)
        return name

    def switch(self, name: str, versions: Iterable[str]) -> None:
        """Point the FileSources at generation `name` (the latest views' and each served version's)."""
        _swap_link(self.source, Path("offline") / name / "all")
        for v in versions:
            _swap_link(self.version_source(v), Path("..") / "offline" / name / f"v{v}")

    def current(self) -> str | None:
        """The generation the latest views read, or None."""
        if not self.source.is_symlink():
            return None
        return Path(os.readlink(self.source)).parts[1]

    def drop_version(self, version: str) -> None:
        """Remove a retired version's FileSource link."""
        path = self.version_source(version)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)

    def clean(self, live: Iterable[Partition]) -> None:
        """Remove generations no link points at (but the newest KEEP_GENERATIONS) and input files of no live
        partition (a replaced content)."""
        if self.gens_dir.is_dir():
            used = {self.current()}
            for link in [*self.root.glob("versions/*.parquet")]:
                if link.is_symlink():
                    used.add(Path(os.readlink(link)).parts[2])
            gens = sorted(
                (g for g in self.gens_dir.iterdir() if g.is_dir() and not g.name.startswith(".")),
                key=lambda g: g.stat().st_mtime_ns,
                reverse=True,
            )
            for g in gens[KEEP_GENERATIONS:]:
                if g.name not in used:
                    shutil.rmtree(g, ignore_errors=True)
        if self.parts_dir.is_dir():
            keep = {n for p in live for n in (p.file_name, p.visible_name)}
            for f in self.parts_dir.glob("*.parquet"):
                if f.name not in keep:
                    f.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system: a copy
        shutil.copyfile(src, dst)


def _swap_link(path: Path, target: Path) -> None:
    """Make `path` a symbolic link to `target` with one os.replace (over a link, a file or nothing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    tmp = path.with_name(f".{path.name}.link")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, path)


def with_hidden(part: Partition, table: pa.Table, losers: np.ndarray) -> tuple[Partition, pa.Table]:
    """The partition's record and visible rows given the mask of its rows that lose a tie."""
    if not losers.any():
        return replace(part, hidden=""), table
    return replace(part, hidden=hidden_digest(table.column("h3_cell").filter(pa.array(losers)))), table.filter(
        pa.array(~losers)
    )
