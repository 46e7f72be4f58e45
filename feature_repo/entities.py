"""The one entity: an H3 cell (its id string, e.g. '8b1f8a...'), at the resolution of `embed.h3_resolution`."""

from feast import Entity, ValueType

h3_cell = Entity(
    name="h3_cell",
    join_keys=["h3_cell"],
    value_type=ValueType.STRING,
    description="H3 cell id (string); lat/lon → cell with h3.latlng_to_cell at params embed.h3_resolution",
)
