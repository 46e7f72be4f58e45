"""explore: a browsable report of a region's embedding space (article figures 15–22), beside the pipeline.

Owns the loaded space (space), the PCA map (map), the report's figures (figures), the headless-browser
check of the page (browser) and the report itself (report). May import every stage below it, through
evaluation (its transport labels).
"""
