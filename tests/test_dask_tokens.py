"""The fast dask tokens of feature-vector columns (serving/dask_tokens.py): a function of the values alone.

dask caches by token, so a token that ignored a value would serve a stale result: every change of a value, a
length or a dtype must change it, and what the fast path does not recognise must get dask's own token.
(The real retrieval with the fast path is test_publish's and test_consumers' point-in-time checks.)
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from dask.base import tokenize

from loc2vec.serving import dask_tokens


def _frame(embedding_scale: float = 1.0) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "h3_cell": [f"8b1f{i:011x}" for i in range(500)],
            "embedding": [rng.standard_normal(16).astype(np.float32) * embedding_scale for _ in range(500)],
            "histogram": [rng.random(12) for _ in range(500)],
            "model_version": ["1"] * 500,
        }
    )


def test_equal_values_give_equal_tokens_and_any_change_another() -> None:
    dask_tokens.register()
    base = _frame()
    assert tokenize(base) == tokenize(_frame())  # other objects, same values
    changed = _frame()
    changed.at[499, "embedding"] = changed.at[499, "embedding"].copy()
    changed.at[499, "embedding"][15] += 1e-6
    assert tokenize(changed) != tokenize(base)
    assert tokenize(_frame(embedding_scale=2.0)) != tokenize(base)
    shorter = _frame()
    shorter.at[3, "histogram"] = shorter.at[3, "histogram"][:11]
    assert tokenize(shorter) != tokenize(base)
    retyped = _frame()
    retyped["embedding"] = [v.astype(np.float64) for v in retyped["embedding"]]
    assert tokenize(retyped) != tokenize(base)
    renamed = _frame()
    renamed.at[0, "h3_cell"] = "8b1f00000000001"
    assert tokenize(renamed) != tokenize(base)
    # strings split differently are different columns
    a = np.array(["ab", "c"], dtype=object)
    b = np.array(["a", "bc"], dtype=object)
    assert dask_tokens.object_array_token(a) != dask_tokens.object_array_token(b)


def test_the_fast_path_recognises_only_what_it_can_hash_and_leaves_the_rest_to_dask() -> None:
    vectors = np.empty(3, dtype=object)
    vectors[:] = [np.zeros(2), np.ones(2), np.arange(2.0)]
    assert dask_tokens.object_array_token(vectors) is not None
    mixed = np.array([np.zeros(2), None, "x"], dtype=object)
    nested = np.empty(2, dtype=object)
    nested[:] = [np.zeros((2, 2)), np.zeros((2, 2))]
    dtypes = np.empty(2, dtype=object)
    dtypes[:] = [np.zeros(2), np.zeros(2, dtype=np.float32)]
    for other in (mixed, nested, dtypes, np.array([1, "a"], dtype=object), np.arange(4.0)):
        assert dask_tokens.object_array_token(other) is None
    dask_tokens.register()
    assert tokenize(mixed) == tokenize(mixed.copy())  # dask's own (pickle) token, still deterministic
