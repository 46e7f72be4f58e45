"""sampling: training locations of a region (the `sample` stage).

Owns the shared SQL rules for POIs, network and mapped land (land), candidate draws (candidates), the
low-information rule (information), the spatial split (split) and the sample itself (samples). May import
core, orchestration, osm and raster.
"""
