"""Typed configuration: params.yaml is the single source of every tunable, validated once at the edge.

`load_params()` is called by the command line and the flows only; it returns a frozen `Params` whose
sections (`params.render`, `params.train`, …) are passed down to library code as typed objects. Every
section rejects unknown keys and wrong types with an error naming the key (`train.lr: Input should be a
valid number …`), so a typo fails loudly instead of silently falling back to a default.

The section models live here, in core, so that any layer can receive them without importing the layer
that uses them; the code that acts on a section lives with its stage.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loc2vec.core.errors import ConfigError
from loc2vec.core.names import validate_region_name

PARAMS_ENV = "LOC2VEC_PARAMS"
KINDS: tuple[str, ...] = ("visits", "transport", "uniform")  # sampling's kinds of location
SPLITS: tuple[str, ...] = ("train", "val", "test")
LOSS_NAMES: tuple[str, ...] = ("softpn", "softmax_ratio", "triplet_margin", "contrastive")
ONLINE_STORES: tuple[str, ...] = ("sqlite", "postgres")
TASK_RUNNERS: tuple[str, ...] = ("auto", "inline", "threads", "dask")


class Section(BaseModel):
    """A params.yaml section: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# ---------------------------------------------------------------- data: regions, database, import, tiles


class RegionSpec(Section):
    """Where a region's extract comes from: a local path or an http(s) URL, with its sha256."""

    name: str
    source: str
    sha256: str | None = None

    @property
    def is_url(self) -> bool:
        """Whether the extract is downloaded (http/https) rather than a local file."""
        return self.source.startswith(("http://", "https://"))

    def local_path(self, root: Path) -> Path:
        """The extract's path (relative sources resolve against the project root)."""
        if self.is_url:
            raise ConfigError(f"region {self.name!r} comes from a URL; fetch it first")
        path = Path(self.source).expanduser()
        return path if path.is_absolute() else (root / path).resolve()


class RegionsConfig(Section):
    default: str = "liechtenstein"
    download_dir: str = "data/osm"  # downloaded (http/https) extracts
    adhoc_registry: str = "data/regions.yaml"  # regions brought with `ingest --pbf`
    registry: dict[str, RegionSpec] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _named_entries(cls, data: Any) -> Any:
        """registry: {name: {source, sha256}} → RegionSpec(name=name, …)."""
        if isinstance(data, dict) and isinstance(data.get("registry"), dict):
            data = dict(data)
            data["registry"] = {
                name: ({"name": name, **spec} if isinstance(spec, dict) else spec)
                for name, spec in data["registry"].items()
            }
        return data

    @model_validator(mode="after")
    def _check(self) -> RegionsConfig:
        for name in self.registry:
            validate_region_name(name)
        if self.default not in self.registry:
            raise ValueError(f"default region {self.default!r} is not in regions.registry")
        return self


class DBConfig(Section):
    """The project's own PostgreSQL cluster; LOC2VEC_PG_DSN or PG* variables override (osm.db.conninfo)."""

    pg_version: int = 15
    cluster: str = "loc2vec"
    host: str = "127.0.0.1"
    port: int = Field(5433, ge=1, le=65535)
    dbname: str = "loc2vec"
    user: str = "loc2vec"
    password: str = "loc2vec"
    meta_schema: str = "loc2vec_meta"

    _meta = field_validator("meta_schema")(validate_region_name)


class IngestConfig(Section):
    osm2pgsql_style: str = "/usr/share/osm2pgsql/default.style"
    cache_mb: int = Field(800, ge=1)
    processes: int = Field(2, ge=1)


class RenderConfig(Section):
    radius_m: float = Field(100.0, gt=0)
    size: int = Field(128, ge=8)
    buffer_px: int = Field(16, ge=0)  # Mapnik's query margin (anti-aliasing: masks are coverage 0..255)

    @property
    def metres_per_pixel(self) -> float:
        """True metres per tile pixel."""
        return 2.0 * self.radius_m / self.size


class AugmentConfig(Section):
    """How positives differ from their anchor (shared by direct shards, metatiles and the fast path)."""

    max_shift_m: float = Field(80.0, ge=0, le=1000)  # |shift| ~ U(0, max) on each axis, random sign
    channel_drop_p: float = Field(0.2, ge=0, lt=1)  # each channel of a positive is switched off with this probability


class ShardsConfig(Section):
    """Direct tiles, the article's scheme: anchor + K positives per location (zarr)."""

    k_positives: int = Field(20, ge=1)
    locations_per_shard: int = Field(16, ge=1)
    zstd_level: int = 3
    processes: int = Field(0, ge=0)  # 0 = one per core
    seed: int = 0


class TilesConfig(Section):
    """The fast path (metatiles + cutter). The margin follows render.radius_m and augment.max_shift_m."""

    metatile_core_px: int = Field(2048, ge=256, le=8192)  # core side C; a metatile is C + 2·margin px square
    render_processes: int = Field(0, ge=0)  # Mapnik processes rendering missing metatiles; 0 = one per core
    device_cache_mb: int = Field(4096, ge=0)  # metatiles kept on an accelerator by the cutter (LRU)


class SampleConfig(Section):
    """Training locations (sampling/): kinds, spatial split and the low-information rule."""

    n_locations: int = Field(4000, ge=1)
    seed: int = 42
    mix: dict[str, float] = Field(default_factory=lambda: {"visits": 0.5, "transport": 0.3, "uniform": 0.2})
    block_m: float = Field(1000.0, gt=0)
    splits: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    extra_buffer_m: float = 0.0  # added to 2·radius (e.g. the augmentation shift)
    min_coverage: float = 0.02
    entropy_floor: float = 0.3
    min_weight: float = Field(0.2, gt=0, le=1)
    oversample: float = 1.25  # first-round draw factor; later rounds use the observed survival rate
    max_rounds: int = Field(6, ge=1)
    workers: int = Field(0, ge=0)  # render processes; 0 = one per core

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if set(self.mix) - set(KINDS) or not any(v > 0 for v in self.mix.values()):
            raise ValueError(f"mix: weights for {list(KINDS)}, at least one > 0; got {self.mix}")
        if set(self.splits) != set(SPLITS) or abs(sum(self.splits.values()) - 1.0) > 1e-6:
            raise ValueError(f"splits: fractions for {list(SPLITS)} summing to 1; got {self.splits}")
        if any(v < 0 for v in (*self.mix.values(), *self.splits.values())):
            raise ValueError("mix and splits must not be negative")
        return self

    def quotas(self) -> dict[str, int]:
        """round(N · mix_k) per kind by largest remainder, so the quotas sum to N exactly."""
        total = sum(self.mix.get(k, 0.0) for k in KINDS)
        exact = {k: self.n_locations * self.mix.get(k, 0.0) / total for k in KINDS}
        out = {k: int(math.floor(v)) for k, v in exact.items()}
        for k in sorted(KINDS, key=lambda k: out[k] - exact[k])[: self.n_locations - sum(out.values())]:
            out[k] += 1
        return out


# ---------------------------------------------------------------- training


class ModelConfig(Section):
    """Encoder hyper-parameters (training/model.py)."""

    in_channels: int = Field(12, ge=1)
    input_size: int = Field(128, ge=8)
    conv_channels: tuple[int, ...] = (16, 32, 64, 96, 128)
    nin_channels: tuple[int, ...] = (64, 32)
    dense_units: int = Field(192, ge=1)
    embedding_dim: int = Field(16, ge=1)
    input_dropout: float = Field(0.05, ge=0, lt=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    leaky_slope: float = 0.1

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not self.conv_channels:
            raise ValueError("conv_channels must not be empty")
        if self.input_size % (2 ** len(self.conv_channels)):
            raise ValueError(
                f"input_size={self.input_size} is not divisible by 2**{len(self.conv_channels)} "
                "(one 2×2 max-pool per conv layer)"
            )
        return self

    @property
    def feature_size(self) -> int:
        """Spatial side of the last feature map (one halving per conv block)."""
        return self.input_size // 2 ** len(self.conv_channels)


class LossConfig(Section):
    """`margin`/`mining` are used only by the losses that take them (training/losses.py)."""

    name: Literal["softpn", "softmax_ratio", "triplet_margin", "contrastive"] = "softpn"
    margin: float = 0.2
    mining: Literal["semi-hard", "hard", "none"] = "semi-hard"
    coverage_weight: float = Field(0.0, ge=0)  # weight of the coverage read-out loss (0: the triplet loss alone)


class TripletsConfig(Section):
    """Batch shape (training/batches.py); the augmentation strengths are `augment:`."""

    locations_per_batch: int = Field(20, ge=2)  # L
    pairs_per_location: int = Field(5, ge=1)  # P
    local_fraction: float = Field(0.0, ge=0, le=1)  # share of batches whose locations come from one neighbourhood
    neighbourhood_m: float = Field(1500.0, gt=0)
    min_separation_m: float = Field(200.0, ge=0)


class TrainConfig(Section):
    # metatiles: cut on the fly (the fast path) | tiles: the stored direct tiles (the article's scheme)
    source: Literal["metatiles", "tiles"] = "metatiles"
    lr: float = Field(1e-3, gt=0)
    min_lr_factor: float = Field(0.05, ge=0, le=1)  # cosine decays to lr·factor at max_steps
    warmup_steps: int = Field(20, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int = Field(600, ge=1)
    max_minutes: float = Field(0.0, ge=0)  # optional wall-clock cap; 0 = none (max_steps is the budget)
    val_every: int = Field(25, ge=1)
    val_batches: int = Field(10, ge=1)
    checkpoint_every: int = Field(25, ge=1)
    patience: int = Field(8, ge=1)  # evaluations without improvement before stopping
    min_delta: float = 0.002
    target_val_accuracy: float = 1.01  # stop early once reached (>1 disables)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile on CUDA
    prefetch: int = Field(2, ge=0)  # batches prepared ahead in a background thread
    experiment_prefix: str = "loc2vec"
    registered_model: str = Field("loc2vec-encoder", min_length=1)
    nproc: int = Field(1, ge=1, strict=True)  # DDP processes `loc2vec train` starts via torchrun
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class PromoteConfig(Section):
    min_delta: float = Field(0.0, ge=0, lt=1)  # the candidate must beat the champion's gate score by more


# ---------------------------------------------------------------- embedding and serving


class EmbedConfig(Section):
    h3_resolution: int = Field(11, ge=0, le=15)  # ~29 m edge; a 200 m tile spans ~7 cells
    batch_size: int = Field(256, ge=1)  # tiles per forward pass (fixed, so the same cells always share a batch)
    tag_counts: bool = True  # per-cell OSM category counts (PostGIS)
    max_cells: int = Field(2_000_000, ge=1)  # refuse (and say so) rather than run for hours on 2 cores


class PublishConfig(Section):
    online_store: Literal["sqlite", "postgres"] = "sqlite"  # LOC2VEC_ONLINE_STORE overrides
    postgres_schema: str = "feast"  # the schema holding Feast's online tables in the project database

    _schema = field_validator("postgres_schema")(validate_region_name)


# ---------------------------------------------------------------- evaluation


class LabelConfig(Section):
    """evaluate.labels (evaluation/labels.py)."""

    jitter_m: float = Field(15.0, ge=0)  # σ of the GPS-like noise, metres per axis
    seed: int = 0
    transport_per_class: int = Field(250, ge=1)
    venue_per_class: int = Field(80, ge=1)
    min_per_class: int = Field(20, ge=1)  # venue groups with fewer POIs are dropped
    min_mode_length_m: float = 1000.0  # transport modes with a shorter network are dropped
    label_time: str = "now"  # "now" or an ISO-8601 time (UTC if no offset)

    @field_validator("label_time")
    @classmethod
    def _time(cls, value: str) -> str:
        if value != "now":
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"'now' or an ISO-8601 time, got {value!r}") from None
        return value

    def event_time(self) -> datetime:
        """The labels' event timestamp (timezone-aware UTC)."""
        if self.label_time == "now":
            return datetime.now(UTC)
        stamp = datetime.fromisoformat(self.label_time)
        return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


class SplitConfig(Section):
    """evaluate.split: blocked K-fold over square blocks."""

    block_m: float = Field(1000.0, gt=0)
    folds: int = Field(5, ge=2)  # every label is tested once, by a model that never saw its blocks
    buffer_m: float | None = Field(None, ge=0)  # None: 2·render.radius_m (train and test tiles never overlap)
    seed: int = 0

    def buffer(self, radius_m: float) -> float:
        """The train/test buffer in metres, given the tile radius."""
        return 2.0 * radius_m if self.buffer_m is None else float(self.buffer_m)


DEFAULT_FEATURESETS: tuple[str, ...] = (
    "loc2vec",
    "latlon",
    "histogram",
    "random_encoder",
    "tag_counts",
    "loc2vec+histogram",
)


class EvaluateConfig(Section):
    labels: LabelConfig = LabelConfig()
    split: SplitConfig = SplitConfig()
    featuresets: tuple[str, ...] = DEFAULT_FEATURESETS
    knn_k: int = Field(10, ge=1)
    logreg_c: float = Field(1.0, gt=0)
    random_encoder_seed: int = 0
    batch_size: int = Field(64, ge=1)  # tiles per random-encoder forward pass
    bootstrap: int = Field(1000, ge=0)  # block-bootstrap resamples for the meta's intervals; 0 = none
    experiment: str = "loc2vec-evaluate"


# ---------------------------------------------------------------- orchestration and exploration


class OrchestrateConfig(Section):
    """Prefect flows (flows/) and the fan-out of metatile rendering and embedding (orchestration/)."""

    task_runner: Literal["auto", "inline", "threads", "dask"] = "auto"  # env LOC2VEC_TASK_RUNNER wins
    max_workers: int = Field(0, ge=0)  # Prefect threads; 0 = one per core
    dask_address: str | None = None  # tcp://host:8786; null = a temporary LocalCluster (env LOC2VEC_DASK_ADDRESS)
    dask_n_workers: int = Field(2, ge=1)
    dask_threads_per_worker: int = Field(1, ge=1)
    embed_chunk_batches: int = Field(32, ge=1)  # embed.batch_size batches per embedding task
    retries: int = Field(3, ge=0)  # transient failures only
    retry_backoff_s: float = Field(10.0, ge=0)  # exponential: backoff, 2·backoff, 4·backoff, …
    retry_jitter_factor: float = Field(0.2, ge=0, le=1)  # each delay ± up to this fraction
    lock_timeout_s: float = 3600.0  # wait this long for a flow's lock (0: fail at once; < 0: wait forever)
    timezone: str = "UTC"  # of the cron schedules
    refresh_cron: str = "0 3 * * 1"
    publish_cron: str = "30 5 * * *"
    mlflow_ui: str = "http://127.0.0.1:5000"
    prefect_ui: str = "http://127.0.0.1:4200"

    @property
    def workers(self) -> int:
        """Prefect threads: max_workers, else one per core."""
        return self.max_workers or os.cpu_count() or 1


class SimilarConfig(Section):
    """explore.similar (serving/similar.py)."""

    k: int = Field(10, ge=1)
    index: Literal["hnsw", "flat"] = "hnsw"  # hnsw: approximate graph (~0.15 ms a query) | flat: exact scan
    hnsw_m: int = Field(32, ge=1)  # graph degree
    ef_construction: int = Field(80, ge=1)
    ef_search: int = Field(64, ge=1)
    exclude_radius_m: float = Field(200.0, ge=0)  # cells whose tiles overlap the query's are not "other places"


class ExploreConfig(Section):
    seed: int = 0
    map_m_per_px: float = Field(8.0, gt=0)
    map_max_px: int = Field(4096, ge=64)
    overlay_opacity: float = Field(0.7, ge=0, le=1)
    pca_points: int = Field(4000, ge=1)
    tsne_points: int = Field(2500, ge=1)
    tsne_perplexity: float = 30.0
    thumbnail_grid: int = Field(7, ge=1)
    walks: int = Field(6, ge=1)
    walk_steps: int = Field(9, ge=2)
    walk_k: int = Field(5, ge=1)
    walk_min_m: float = Field(400.0, ge=0)
    interpolation_steps: int = Field(8, ge=2)
    transport_lda: bool = True
    experiment: str = "loc2vec-explore"
    similar: SimilarConfig = SimilarConfig()


class PipelineConfig(Section):
    regions: tuple[str, ...] = ()  # regions `dvc repro` and the Prefect pipeline run

    @field_validator("regions")
    @classmethod
    def _names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(validate_region_name(r) for r in value)


# ---------------------------------------------------------------- the root


class Params(Section):
    """params.yaml as a whole, plus the project root it was read from."""

    root: Path = Field(exclude=True)
    regions: RegionsConfig
    db: DBConfig = DBConfig()
    ingest: IngestConfig = IngestConfig()
    render: RenderConfig = RenderConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    augment: AugmentConfig = AugmentConfig()
    shards: ShardsConfig = ShardsConfig()
    triplets: TripletsConfig = TripletsConfig()
    train: TrainConfig = TrainConfig()
    tiles: TilesConfig = TilesConfig()
    sample: SampleConfig = SampleConfig()
    pipeline: PipelineConfig = PipelineConfig()
    promote: PromoteConfig = PromoteConfig()
    embed: EmbedConfig = EmbedConfig()
    publish: PublishConfig = PublishConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    orchestrate: OrchestrateConfig = OrchestrateConfig()
    explore: ExploreConfig = ExploreConfig()

    @model_validator(mode="after")
    def _pipeline_regions_known(self) -> Params:
        unknown = [r for r in self.pipeline.regions if r not in self.regions.registry]
        if unknown:
            raise ValueError(f"pipeline.regions {unknown} are not in regions.registry")
        return self

    @property
    def pipeline_regions(self) -> tuple[str, ...]:
        """The regions the pipeline runs: pipeline.regions, else the default region."""
        return self.pipeline.regions or (self.regions.default,)

    @property
    def reserved_schemas(self) -> tuple[str, ...]:
        """Schemas the configuration gives to something other than a region."""
        return (self.db.meta_schema, self.publish.postgres_schema)

    def section(self, name: str) -> dict[str, Any]:
        """A section as plain data (for logging it, e.g. as MLflow params)."""
        value = getattr(self, name)
        if not isinstance(value, Section):
            raise ConfigError(f"params.yaml has no section {name!r}")
        return value.model_dump(mode="json")


# ---------------------------------------------------------------- loading


def project_root() -> Path:
    """The directory holding params.yaml: $LOC2VEC_PARAMS's parent, the cwd or the source checkout."""
    env = os.environ.get(PARAMS_ENV)
    if env:
        return Path(env).resolve().parent
    for base in (Path.cwd(), *Path.cwd().parents):
        if (base / "params.yaml").is_file() and (base / "loc2vec").is_dir():
            return base
    return Path(__file__).resolve().parents[2]


def params_path() -> Path:
    """params.yaml: $LOC2VEC_PARAMS, else the project root's."""
    env = os.environ.get(PARAMS_ENV)
    return Path(env).resolve() if env else project_root() / "params.yaml"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not "last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's data; syntax errors and duplicate keys become a ConfigError naming file and line."""
    try:
        with open(path) as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{path}{where}: {problem}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None


def _error_lines(exc: ValidationError) -> str:
    """Each problem as `key.path: message (got value)`."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r})"
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}{got}")
    return "; ".join(lines)


def parse_params(raw: Any, root: Path, *, source: str = "params.yaml") -> Params:
    """Validate params data (a mapping of sections) into a frozen Params, or raise one ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    if "root" in raw:
        raise ConfigError(f"{source}: root: unknown key")
    data = dict(raw)
    regions = dict(data.get("regions") or {})
    adhoc = root / regions.get("adhoc_registry", "data/regions.yaml")
    if adhoc.is_file():  # regions brought with `ingest --pbf`; params.yaml's own entries win
        extra = read_yaml(adhoc) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{adhoc}: expected a mapping of regions")
        registry = dict(regions.get("registry") or {})
        for name, spec in extra.items():
            registry.setdefault(name, spec)
        regions["registry"] = registry
        data["regions"] = regions
    try:
        return Params.model_validate({**data, "root": root})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_error_lines(exc)}") from None


def load_params(path: Path | str | None = None) -> Params:
    """Load and validate params.yaml (and the ad-hoc region registry it names).

    Call it at the edge only (the CLI, the flows, benchmarks, tests) and pass sections down.

    Args:
        path: params.yaml; default $LOC2VEC_PARAMS, else the project root's.

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: the file is missing, not valid YAML, has duplicate or unknown keys, or a value of
            the wrong type or range (the message names each key).
    """
    p = Path(path).resolve() if path else params_path()
    if not p.is_file():
        raise ConfigError(f"params file not found: {p}")
    return parse_params(read_yaml(p), p.parent, source=str(p))
