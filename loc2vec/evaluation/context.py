"""What an evaluation reads besides its labels: the feature store, the map data and the encoders' tiles.

Built once at the edge (`EvaluationContext.from_params`) and passed down, so featuresets and classifiers
never look configuration up themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from loc2vec.core.config import ModelConfig, OrchestrateConfig, Params, RenderConfig
from loc2vec.core.paths import ProjectPaths
from loc2vec.evaluation.labels import LabelSource
from loc2vec.osm.db import ConnInfo
from loc2vec.raster.metatiles import MetatileSpec
from loc2vec.serving.store import StoreSettings


@dataclass(frozen=True)
class EvaluationContext:
    """The project an evaluation runs in.

    Attributes:
        store: the feature store (loc2vec and the Feast baselines are read from it).
        paths: the project's paths (metatiles, embeddings, the MLflow store).
        info: the database (labels, tag counts).
        spec: the metatiles' geometry (tiles for the encoder featuresets).
        orchestrate: the task runner rendering missing metatiles.
        model: the architecture of the untrained `random_encoder`.
        radius_m: the tile radius (tag-count discs, label margins, the fold buffer).
        render: the tile geometry (the leak-free suite renders masked tiles with it; None: params' default).
    """

    store: StoreSettings
    paths: ProjectPaths
    info: ConnInfo
    spec: MetatileSpec
    orchestrate: OrchestrateConfig
    model: ModelConfig
    radius_m: float
    render: RenderConfig | None = None

    @classmethod
    def from_params(cls, params: Params, info: ConnInfo, online_store: str | None = None) -> EvaluationContext:
        """The evaluation context params describe.

        Args:
            params: the loaded params.yaml.
            info: the database.
            online_store: "sqlite" or "postgres" over params and $LOC2VEC_ONLINE_STORE.

        Returns:
            The context (immutable).
        """
        paths = ProjectPaths.from_params(params)
        return cls(
            store=StoreSettings.from_config(params.publish, params.embed, paths, info, online_store),
            paths=paths,
            info=info,
            spec=MetatileSpec.from_config(params.render, params.augment, params.tiles),
            orchestrate=params.orchestrate,
            model=params.model,
            radius_m=params.render.radius_m,
            render=params.render,
        )

    @property
    def labels(self) -> LabelSource:
        """Where labels are made from: this database, tile radius and H3 resolution."""
        return LabelSource(self.info, self.radius_m, self.store.h3_resolution)
