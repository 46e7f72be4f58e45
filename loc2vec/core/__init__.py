"""core: what every stage shares and nothing stage-specific.

Owns the typed configuration (config), the project's paths (paths), region names (names), errors,
atomic writes and file locks (atomic), geometry helpers (geo), spawned process pools (pools) and the
MLflow store location (tracking). May import nothing else from loc2vec.
"""
