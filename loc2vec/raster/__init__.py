"""raster: OSM in PostGIS → 12-channel tiles (the `render` stage).

Owns the channel definitions (channels), Mapnik tile rendering (render), the metatile grid (grid), the
rendered metatiles and their fan-out (metatiles), cutting tiles from them (cutter), the article's stored
direct tiles (stored) and pictures for people (preview). May import core, orchestration and osm.
"""
