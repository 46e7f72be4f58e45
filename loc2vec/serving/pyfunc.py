"""The champion as an MLflow pyfunc model: a DataFrame of lat/lon in, one embedding per row out.

Why a lookup, not the encoder: the published store already holds the champion's vector of every embedded
cell, and a consumer's model (an MLflow pipeline, a batch scorer) should get exactly what `loc2vec features`
and the feature server return for the version it pins, without torch, Mapnik or the map database. The
pyfunc is pinned to one model version (the champion's when logged): publishing a newer champion does not
change what it returns.

Not rendered: a location whose cell is not published raises LocationNotPublishedError (as
`get_location_embeddings` does). Rendering and encoding such a cell would need the pipeline's whole stack
(PostGIS with the region imported, Mapnik, torch, the model weights) inside the pyfunc's environment,
which is what this flavour exists to avoid; `loc2vec embed` + `loc2vec publish` add a region instead.

Where the store is: ``model_config`` (recorded when logged, overridable at load with
``mlflow.pyfunc.load_model(uri, model_config=…)``) holds the store kind, the project root whose
data/feast holds a file registry and SQLite store, the database settings without password (db: params'
``db`` section; the password comes from the pgpass file or LOC2VEC_PG_DSN on the host that loads it), the
schemas and the Redis connection without password. The loaded model imports loc2vec from its own copy
(``code_paths``, with feature_repo/ beside it) and needs only the client install's packages, pinned in its
requirements.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.pyfunc import PythonModel

from loc2vec.core.config import DBConfig
from loc2vec.core.paths import ProjectPaths
from loc2vec.serving.store import SOURCE_REPO, StoreSettings, redact_redis

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the loc2vec package, shipped as the model's code
# The client install's packages (pyproject's base dependencies), pinned to this environment's versions:
# the tested set, which `mlflow.pyfunc` records as the model's requirements.
REQUIREMENTS = (
    "feast", "h3", "pandas", "numpy", "pyarrow", "pyyaml", "pydantic", "psycopg2-binary", "psycopg",
    "sqlalchemy",  # Feast's SQL registry (the postgres store): 2.0 tested, pip would pick 2.1
)  # fmt: skip
EXTRAS = {"psycopg": "[binary,pool]"}


def pinned_requirements() -> list[str]:
    """`name==version` of each requirement as installed here (mlflow is added by MLflow itself)."""
    return [f"{n}{EXTRAS.get(n, '')}=={importlib.metadata.version(n)}" for n in REQUIREMENTS]


def lookup_config(settings: StoreSettings, db: DBConfig, version: str) -> dict[str, Any]:
    """What the pyfunc needs to find the store and the version it serves (no password)."""
    return {
        "version": version,
        "online_store": settings.kind,
        "project_root": str(settings.paths.root),
        "h3_resolution": settings.h3_resolution,
        "postgres_schema": settings.postgres_schema,
        "registry_schema": settings.registry_schema,
        "redis": redact_redis(settings.redis) if "password=" in settings.redis else settings.redis,
        "db": db.model_dump(mode="json", exclude={"password"}),
    }


def settings_from_config(config: dict[str, Any]) -> StoreSettings:
    """The StoreSettings a lookup_config describes (database credentials resolved on this host)."""
    from loc2vec.osm.db import conninfo, reader_conninfo

    db = DBConfig.model_validate(config["db"])
    info = conninfo(db)
    return StoreSettings(
        kind=config["online_store"],
        paths=ProjectPaths(root=Path(config["project_root"])),
        info=info,
        postgres_schema=config["postgres_schema"],
        h3_resolution=int(config["h3_resolution"]),
        reader=reader_conninfo(db, info),
        redis=config["redis"],
        registry_schema=config["registry_schema"],
    )


class LocationEmbeddings(PythonModel):
    """lat/lon → the pinned model version's published embeddings (serving/lookup.py)."""

    def load_context(self, context: Any) -> None:
        """Resolve the store once, when the model is loaded."""
        self.config = dict(context.model_config or {})
        self.settings = settings_from_config(self.config)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """One row per input row: h3_cell, embedding (16 floats), model_name, model_version.

        Raises:
            ValueError: the input lacks `lat` or `lon` columns.
            LocationNotPublishedError: a location's cell has no published embedding (nothing is rendered).
        """
        from loc2vec.serving.lookup import get_location_embeddings

        missing = {"lat", "lon"} - set(model_input.columns)
        if missing:
            raise ValueError(f"the input needs columns lat and lon (missing {sorted(missing)})")
        out = get_location_embeddings(
            model_input["lat"].to_numpy(float),
            model_input["lon"].to_numpy(float),
            self.settings,
            self.config["version"],
        )
        return out[["h3_cell", "embedding", "model_name", "model_version"]]


def log_pyfunc(settings: StoreSettings, db: DBConfig, version: str, *, name: str = "location_embeddings") -> Any:
    """Log the lookup pyfunc of `version` to the active MLflow run (or a new one); returns its ModelInfo.

    The input example is Vaduz; the signature is inferred from it by a lookup in the store, so the store
    must serve `version` when this runs.
    """
    config = lookup_config(settings, db, version)
    example = pd.DataFrame({"lat": [47.141], "lon": [9.521]})
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=LocationEmbeddings(),
        model_config=config,
        # loc2vec and the store templates beside it (serving/store.py finds feature_repo/ next to the package)
        code_paths=[str(PACKAGE_DIR), str(SOURCE_REPO)],
        pip_requirements=pinned_requirements(),
        input_example=example,
    )
