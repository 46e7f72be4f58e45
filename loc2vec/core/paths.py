"""Every location under the project root, in one place.

Stage commands in dvc.yaml pass their inputs and outputs explicitly; these are the defaults the command
line falls back to, and the places that are not stage outputs (caches, locks, stores). A region outside
`pipeline.regions` keeps its metatiles under data/scratch/, so rendering it ad hoc never changes what DVC
tracks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from loc2vec.core.config import Params
from loc2vec.core.names import validate_model_version, validate_region_name


@dataclass(frozen=True)
class ProjectPaths:
    """Paths of a project (a checkout, or a test project) rooted at `root`."""

    root: Path
    pipeline_regions: tuple[str, ...] = ()
    download_dir_name: str = "data/osm"
    adhoc_registry_name: str = "data/regions.yaml"
    # Explicit inputs and outputs of a stage command (dvc.yaml passes them), per region, over the defaults.
    sample_files: tuple[tuple[str, Path], ...] = ()
    metatile_dirs: tuple[tuple[str, Path], ...] = ()
    params_source: Path | None = None  # the params file read, where it is not the root's params.yaml

    @classmethod
    def from_params(cls, params: Params) -> ProjectPaths:
        """The paths of the project params.yaml was read from."""
        return cls(
            root=params.root,
            pipeline_regions=params.pipeline_regions,
            download_dir_name=params.regions.download_dir,
            adhoc_registry_name=params.regions.adhoc_registry,
            params_source=params.file,
        )

    def overriding(
        self, *, samples: Mapping[str, Path] | None = None, metatiles: Mapping[str, Path] | None = None
    ) -> ProjectPaths:
        """These paths with some regions' samples files or metatile directories given explicitly."""
        return replace(
            self,
            sample_files=tuple({**dict(self.sample_files), **(samples or {})}.items()),
            metatile_dirs=tuple({**dict(self.metatile_dirs), **(metatiles or {})}.items()),
        )

    @property
    def data(self) -> Path:
        """data/: every pipeline output (DVC-tracked) and local state."""
        return self.root / "data"

    @property
    def params_file(self) -> Path:
        """The params file these paths were read from (`loc2vec --params P`), else the root's params.yaml."""
        return self.params_source or self.root / "params.yaml"

    @property
    def dvc_lock(self) -> Path:
        """dvc.lock: what DVC recorded of each stage's inputs and outputs."""
        return self.root / "dvc.lock"

    # ---------------------------------------------------------------- OSM
    @property
    def download_dir(self) -> Path:
        """Downloaded (http/https) extracts, verified by checksum."""
        return self.root / self.download_dir_name

    @property
    def adhoc_registry(self) -> Path:
        """Regions brought with `loc2vec ingest --pbf` (not git-tracked)."""
        return self.root / self.adhoc_registry_name

    def extract(self, region: str) -> Path:
        """The pipeline's copy of a region's extract (the ingest stage's DVC output)."""
        return self.data / "osm" / f"{validate_region_name(region)}.osm.pbf"

    def ingest_record(self, region: str) -> Path:
        """The ingest stage's record of a region's import (no wall-clock fields)."""
        return self.data / "ingest" / f"{validate_region_name(region)}.json"

    # ---------------------------------------------------------------- samples and tiles
    @property
    def samples_dir(self) -> Path:
        """data/samples/: one Parquet per region."""
        return self.data / "samples"

    def samples(self, region: str) -> Path:
        """A region's training locations (the sample stage's output)."""
        name = validate_region_name(region)
        return Path(dict(self.sample_files).get(name) or self.samples_dir / f"{name}.parquet")

    def metatiles(self, region: str) -> Path:
        """data/metatiles/<region> for the pipeline's regions, data/scratch/metatiles/<region> otherwise."""
        name = validate_region_name(region)
        given = dict(self.metatile_dirs)
        if name in given:
            return Path(given[name])
        base = self.data if name in self.pipeline_regions else self.scratch
        return base / "metatiles" / name

    def tile_store(self, region: str) -> Path:
        """The article's stored direct tiles (`loc2vec render-tiles`)."""
        return self.data / "tiles" / f"{validate_region_name(region)}.zarr"

    @property
    def scratch(self) -> Path:
        """data/scratch/: derived data of regions outside the pipeline (not DVC-tracked)."""
        return self.data / "scratch"

    # ---------------------------------------------------------------- training
    @property
    def model_dir(self) -> Path:
        """data/model/: the trained encoder, its curve and summary (the train stage's output)."""
        return self.data / "model"

    @property
    def promotion(self) -> Path:
        """The champion gate's decision (the promote stage's metric)."""
        return self.data / "promotion.json"

    @property
    def checkpoints(self) -> Path:
        """data/checkpoints/: the resumable training checkpoint."""
        return self.data / "checkpoints"

    @property
    def mlflow_db(self) -> Path:
        """The project's MLflow store (sqlite)."""
        return self.root / "mlflow.db"

    @property
    def mlruns(self) -> Path:
        """MLflow artifacts of the project's store."""
        return self.root / "mlruns"

    # ---------------------------------------------------------------- embeddings and serving
    @property
    def embeddings_dir(self) -> Path:
        """data/embeddings/: one Parquet per region."""
        return self.data / "embeddings"

    def embeddings(self, region: str) -> Path:
        """A region's embeddings (the embed stage's output)."""
        return self.embeddings_dir / f"{validate_region_name(region)}.parquet"

    @property
    def feature_repo(self) -> Path:
        """Where Feast resolves the relative paths of feature_store.yaml."""
        return self.root / "feature_repo"

    @property
    def feast(self) -> Path:
        """Registry, SQLite online store and offline Parquet."""
        return self.data / "feast"

    @property
    def offline_store(self) -> Path:
        """Feast's offline source: every published region and model version."""
        return self.feast / "embeddings.parquet"

    def version_offline_store(self, version: str) -> Path:
        """Feast's offline source of one model version (its pinned feature view reads only this)."""
        return self.feast / "versions" / f"embeddings_v{validate_model_version(version)}.parquet"

    @property
    def redis_dir(self) -> Path:
        """The local redis-server's data and log (`loc2vec redis start`): derived data, rebuilt by publish."""
        return self.feast / "redis"

    def publish_state(self, store_kind: str) -> Path:
        """What the last publish to a store recorded (its idempotence)."""
        return self.feast / f"published_{store_kind}.json"

    def published_record(self, region: str) -> Path:
        """The publish stage's record of a region."""
        return self.feast / "published" / f"{validate_region_name(region)}.json"

    @property
    def similar_index(self) -> Path:
        """data/index/: the vector index of `loc2vec similar` (derived, rebuilt on demand)."""
        return self.data / "index"

    # ---------------------------------------------------------------- evaluation
    def evaluation(self, region: str) -> Path:
        """A region's evaluation metrics (the evaluate stage's output)."""
        return self.data / "evaluate" / f"{validate_region_name(region)}.json"

    def suite_inputs(self, region: str) -> Path:
        """A region's model-independent suite inputs (the suite_inputs stage's output, evaluation/suite_inputs.py)."""
        return self.data / "suite" / validate_region_name(region)

    # ---------------------------------------------------------------- coordination
    def lock(self, name: str) -> Path:
        """An OS file lock; outside every DVC output, whose content must change only with the data."""
        return self.data / ".locks" / f"{name}.lock"
