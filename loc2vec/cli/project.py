"""The project a command runs in: params.yaml loaded once, its paths, and the database resolved once.

The command line (and the Prefect flows) build one `Project` at the edge and pass its parts down to
library code, which never looks configuration up itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loc2vec.core.config import Params, load_params
from loc2vec.core.paths import ProjectPaths
from loc2vec.osm.db import ConnInfo, conninfo, reader_conninfo


@dataclass(frozen=True)
class Project:
    """params.yaml, the project's paths and its database (the pipeline's role; `reader` for consumers)."""

    params: Params
    paths: ProjectPaths
    info: ConnInfo

    @property
    def reader(self) -> ConnInfo:
        """The read-only role on the same database: what consumers' lookups connect as."""
        return reader_conninfo(self.params.db, self.info)

    @classmethod
    def load(cls, params_file: Path | str | None = None) -> Project:
        """Load params.yaml (default: $LOC2VEC_PARAMS, else the project root's) and resolve the database."""
        params = load_params(params_file)
        return cls(params, ProjectPaths.from_params(params), conninfo(params.db))
