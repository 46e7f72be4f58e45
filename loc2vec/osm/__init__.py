"""osm: OpenStreetMap extracts into PostGIS (the `ingest` stage).

Owns the database connection and import metadata (db), the project's own PostgreSQL cluster (cluster),
fetching and verifying extracts (extracts) and the atomic osm2pgsql import (ingest). May import core
and orchestration.
"""
