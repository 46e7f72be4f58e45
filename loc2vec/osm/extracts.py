"""OSM extracts: copy or download once, verify the sha256, and read them fully before any import.

A downloaded extract goes to a temporary file and is moved into place only after its checksum matched,
so a partial download is never mistaken for the real file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tqdm import tqdm

from loc2vec.core.atomic import atomic_path
from loc2vec.core.config import RegionSpec
from loc2vec.core.errors import Loc2VecError


class IngestError(Loc2VecError, RuntimeError):
    """An extract could not be fetched, verified or imported; the previous import is untouched."""


@dataclass(frozen=True)
class ExtractInfo:
    path: Path
    sha256: str
    osm_timestamp: datetime | None
    bbox: tuple[float, float, float, float]  # west, south, east, north


def sha256_file(path: Path) -> str:
    """The file's sha256, hex."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fetch_extract(spec: RegionSpec, root: Path, download_dir: Path) -> Path:
    """Return a local, checksum-verified path for a region's extract (downloading URLs once).

    Args:
        spec: the region's source and checksum.
        root: the project root (relative sources resolve against it).
        download_dir: where downloaded extracts are kept.
    """
    if not spec.is_url:
        path = spec.local_path(root)
        if not path.is_file():
            raise IngestError(f"extract for region {spec.name!r} not found: {path}")
        if spec.sha256:
            _verify(path, spec.sha256, spec.name)
        return path
    if not spec.sha256:
        raise IngestError(
            f"region {spec.name!r} comes from a URL without a sha256 in params.yaml; "
            "download it once, run `sha256sum` on it and add the checksum"
        )
    target = download_dir / f"{spec.name}.osm.pbf"
    if target.is_file() and sha256_file(target) == spec.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(spec.source, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {spec.name}") as bar:
                while block := resp.read(1 << 20):
                    out.write(block)
                    bar.update(len(block))
        _verify(Path(tmp_name), spec.sha256, spec.name)
        os.replace(tmp_name, target)
    except Exception as exc:
        Path(tmp_name).unlink(missing_ok=True)
        if isinstance(exc, IngestError):
            raise
        raise IngestError(f"download of {spec.source} failed: {exc}") from exc
    return target


def _verify(path: Path, expected: str, region: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise IngestError(f"checksum mismatch for region {region!r} ({path}): expected sha256 {expected}, got {actual}")


def inspect_extract(path: Path) -> ExtractInfo:
    """Read the extract fully with osmium: checksum, data timestamp and bounding box.

    Reading every block also catches truncated or corrupt files before the database is touched.
    """
    if not shutil.which("osmium"):
        raise IngestError("osmium (osmium-tool) not found: run `make setup`")
    proc = subprocess.run(["osmium", "fileinfo", "-e", "-j", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise IngestError(f"{path} is not a readable OSM extract: {proc.stderr.strip() or 'osmium failed'}")
    info = json.loads(proc.stdout)
    header = info.get("header", {})
    options = header.get("option", {})
    stamp = options.get("osmosis_replication_timestamp") or options.get("timestamp")
    stamp = stamp or info.get("data", {}).get("timestamp", {}).get("last")
    # The header bbox is the extract's cut (Geofabrik, `osmium extract --set-bounds`); without one,
    # fall back to the data bbox, which is wider (complete ways and relations reach outside the cut).
    boxes = header.get("boxes") or [info.get("data", {}).get("bbox")]
    if not boxes or not boxes[0]:
        raise IngestError(f"{path} holds no data (empty bounding box)")
    west, south, east, north = (float(v) for v in boxes[0])
    return ExtractInfo(
        path=path,
        sha256=sha256_file(path),
        osm_timestamp=datetime.fromisoformat(stamp.replace("Z", "+00:00")) if stamp else None,
        bbox=(west, south, east, north),
    )


def fetch_to(spec: RegionSpec, out: Path, root: Path, download_dir: Path) -> Path:
    """Put the region's verified extract at `out` (atomically), so DVC can version it."""
    src = fetch_extract(spec, root, download_dir)
    with atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
    return out
