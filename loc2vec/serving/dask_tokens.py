"""Fast dask tokens for object arrays of feature vectors: Feast's file offline store re-hashes the whole table.

Feast's file offline store runs the point-in-time join with dask and calls ``persist()`` a dozen times per
feature view; each call tokenizes the materialised frames. A pandas column of feature vectors (``embedding``,
``histogram``, ``tag_counts``: one small ndarray per row) is an object array, which dask can only hash by
pickling it, twice, to check that the pickle is deterministic. Measured on Liechtenstein's 89,492 published cells:
a historical retrieval of 1,000 rows took 68 s, 62 s of it in that tokenization (cProfile; `loc2vec bench historical` measures both paths).

`register()` adds one fast path to dask's ``normalize_token`` for numpy arrays: an object array whose columns
(rows of pandas' 2-D block) each hold only 1-D numeric ndarrays of one dtype, or only str, is hashed from its
values (lengths + concatenated bytes; joined strings with their lengths). Anything else goes to dask's own
normaliser, unchanged. The token is a function of the values alone (deterministic across processes), so
dask's caching stays correct; a library cannot do this for us (dask cannot assume what an object array holds).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_REGISTERED = False


def _column_token(values: np.ndarray) -> tuple[Any, ...] | None:
    """Token of a 1-D object array of same-dtype 1-D ndarrays or of str; None when it holds anything else."""
    first = values[0]
    if type(first) is str:
        if not all(type(v) is str for v in values):
            return None
        from dask.hashing import hash_buffer_hex

        lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
        text = "".join(values).encode("utf-8", errors="surrogatepass")
        return ("str", hash_buffer_hex(lengths), hash_buffer_hex(text))
    if type(first) is not np.ndarray or first.dtype.hasobject:
        return None
    dtype = first.dtype
    if not all(type(v) is np.ndarray and v.ndim == 1 and v.dtype == dtype for v in values):
        return None
    from dask.hashing import hash_buffer_hex

    lengths = np.fromiter((v.size for v in values), dtype=np.int64, count=len(values))
    data = np.concatenate(list(values)) if lengths.sum() else np.empty(0, dtype=dtype)
    return ("vectors", dtype.str, hash_buffer_hex(lengths), hash_buffer_hex(np.ascontiguousarray(data).view("i1")))


def object_array_token(x: np.ndarray) -> tuple[Any, ...] | None:
    """The fast token of a 1-D or 2-D object array (2-D: pandas' block, one column per row), or None."""
    if not x.dtype.hasobject or x.ndim not in (1, 2) or x.size == 0:
        return None
    rows = x.reshape(1, -1) if x.ndim == 1 else x
    tokens = []
    for row in rows:
        token = _column_token(row)
        if token is None:
            return None
        tokens.append(token)
    return ("loc2vec-object-array", x.shape, tuple(tokens))


def register() -> None:
    """Put the fast path in front of dask's numpy normaliser (idempotent; dask's own stays the fallback)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from dask.tokenize import normalize_token

    dask_normalize = normalize_token.dispatch(np.ndarray)  # also runs dask's lazy numpy registration first

    def normalize(x: np.ndarray) -> Any:
        token = object_array_token(x) if x.dtype.hasobject else None
        return dask_normalize(x) if token is None else token

    normalize_token.register(np.ndarray, normalize)
    _REGISTERED = True
