"""The srai peers on the real test region: fitted and computed by srai, each label without its own object.

What the object carries is read from PostGIS independently of the peers' code (the row osm2pgsql stored,
columns and hstore tags); the contextual counts at a label's cell must drop exactly its tag values, and
Hex2Vec must change exactly where the object is among the counted features.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
import pytest
from psycopg2 import sql

from loc2vec.cli.project import Project
from loc2vec.evaluation.leakfree import MASKED_TASKS, make_leakfree_labels
from loc2vec.evaluation.peers import FOOTPRINT, PEERS, Peers, hidden_feature_ids, tag_filter
from loc2vec.osm.db import cursor

from .fixtures.project import evaluation_context


@functools.cache
def _labels(task: str) -> pd.DataFrame:
    p = Project.load()
    cfg = p.params.evaluate.labels.model_copy(
        update={
            "seed": 3,
            "transport_per_class": 12,
            "venue_per_class": 12,
            "building_per_class": 12,
            "min_per_class": 4,
        }
    )
    return make_leakfree_labels("test_li", task, cfg, evaluation_context(p).labels)


@pytest.fixture(scope="module")
def peers(project, region: str) -> Peers:
    p = Project.load()
    return Peers(p.params.evaluate.suite, p.info, (region,))


def _object_tags(proj: Project, region: str, table: str, osm_id: int) -> set[str]:
    """srai column names (key_value) of the tag values the object carries in srai's filter, from PostGIS."""
    tables = ["planet_osm_point"] if table == "point" else ["planet_osm_line", "planet_osm_polygon"]
    keys = tag_filter()
    out: set[str] = set()
    with cursor(proj.info) as cur:
        for t in tables:
            cur.execute(
                sql.SQL("SELECT to_jsonb(r) - 'way' FROM {}.{} r WHERE osm_id = %s").format(
                    sql.Identifier(region), sql.Identifier(t)
                ),
                (int(osm_id),),
            )
            for (row,) in cur.fetchall():
                tags = {**{k: v for k, v in row.items() if k != "tags" and v is not None}, **(row.get("tags") or {})}
                for k, values in keys.items():
                    v = tags.get(k)
                    if k == "building" and v is not None and v != "no":
                        v = FOOTPRINT
                    if v in values:
                        out.add(f"{k}_{v}")
    return out


@pytest.mark.parametrize("task", MASKED_TASKS)
def test_peer_inputs_lose_exactly_the_label_object(peers: Peers, region: str, task: str) -> None:
    proj = Project.load()
    labels = _labels(task)
    assert len(labels) >= 8
    unmasked_labels = labels.assign(hidden_id=0)
    masked = peers.embed("srai_contextual_counts", labels)
    unmasked = peers.embed("srai_contextual_counts", unmasked_labels)
    columns = peers.columns["srai_contextual_counts"]
    assert masked.shape == unmasked.shape == (len(labels), len(columns)) and np.isfinite(masked).all()
    diff = unmasked - masked
    assert (diff >= -1e-9).all(), "hiding an object only ever removes counts"
    changed = 0
    for i, row in enumerate(labels.itertuples()):
        tags = _object_tags(proj, region, row.hidden_table, row.hidden_id)
        if task == "building_type":
            tags.discard(f"building_{FOOTPRINT}")  # the footprint stays, as in the tile and the tag counts
        assert "building" not in {c.split("_", 1)[0] for c in tags} or task != "building_type"
        cols = {j for j, c in enumerate(columns) if c in tags}
        others = [j for j in range(len(columns)) if j not in cols]
        assert np.allclose(diff[i, others], 0.0), f"{row.label_id}: only the object's own tag values change"
        if cols:
            assert (diff[i, sorted(cols)] > 0).all(), f"{row.label_id}: each of the object's values drops"
            if row.hidden_table == "point":  # a node is in one cell: each value drops by that cell's one weight
                assert np.allclose(diff[i, sorted(cols)], diff[i, min(cols)]), row.label_id
                weights = [1.0, *(1 / (d + 1) ** 2 / (6 * d) for d in (1, 2))]  # its cell, or one of ring d's 6d
                assert min(abs(diff[i, min(cols)] - w) for w in weights) < 1e-9, row.label_id
            changed += 1
    if task != "transport_context":  # srai's filter has no highway=*: a hidden road carries no counted tag
        assert changed > 0, "some labels' objects carry counted tags"
    assert not any(c.startswith("building_") and c != f"building_{FOOTPRINT}" for c in columns), "no building types"

    h_masked = peers.embed("srai_hex2vec", labels)
    h_unmasked = peers.embed("srai_hex2vec", unmasked_labels)
    assert h_masked.shape == (len(labels), 50) and np.isfinite(h_masked).all()
    moved = 0
    for i, row in enumerate(labels.itertuples()):
        tags = _object_tags(proj, region, row.hidden_table, row.hidden_id)
        if task == "building_type":
            tags.discard(f"building_{FOOTPRINT}")
        same = np.allclose(h_masked[i], h_unmasked[i])
        if not tags:
            assert same, f"{row.label_id}: an object srai does not count leaves Hex2Vec unchanged"
        moved += not same
    if task != "transport_context":
        assert moved > 0, "Hex2Vec of a cell without the label's counted object differs"
    else:  # srai's filter has no highway=* or railway=*: the hidden way is never among a peer's inputs, so the peers
        # of the masked scene are those of the plain one (the consumer transport task's, on the same points)
        assert "highway" not in tag_filter() and "railway" not in tag_filter()
        features = peers.features(region)
        assert not any(f in features.index for ids in hidden_feature_ids(labels) for f in ids)
        assert np.array_equal(masked, unmasked) and np.array_equal(h_masked, h_unmasked)


def test_hex2vec_is_fitted_once_on_the_training_region(peers: Peers) -> None:
    assert set(PEERS) == {"srai_contextual_counts", "srai_hex2vec"}
    assert "fit_hex2vec" in peers.seconds
    fitted = peers._hex2vec
    peers.embed("srai_hex2vec", _labels("venue_context"))
    assert peers._hex2vec is fitted, "one fit per suite run"


def test_hex2vec_runs_on_one_thread_and_gives_the_caller_its_threads_back(peers: Peers) -> None:
    """Two threads gave another seeded fit in a few busy processes (peers._one_thread); the encoder now sees one
    thread, and the suite's other featuresets keep the command's count."""
    import torch

    seen: list[int] = []
    hook = peers._hex2vec._model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        peers.embed("srai_hex2vec", _labels("venue_context"))
    finally:
        hook.remove()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("task", ["venue_context", "building_type"])
def test_contextual_counts_without_the_object_are_srais_own_recomputation(peers: Peers, region: str, task: str) -> None:
    """The suite subtracts each hidden object's count vector with its rings' weights (one srai call for all
    labels); srai recomputing each label's rings from the features without its object gives the same vector."""
    import h3
    from srai.embedders import ContextualCountEmbedder
    from srai.neighbourhoods import H3Neighbourhood

    from loc2vec.evaluation.peers import _cells_gdf, _join, _masked

    labels = _labels(task)
    fast = peers.embed("srai_contextual_counts", labels)
    cfg = peers.cfg
    features = peers.features(region)
    keep = task == "building_type"
    checked = 0
    for i, (row, hidden) in enumerate(zip(labels.itertuples(), hidden_feature_ids(labels), strict=True)):
        centre = h3.latlng_to_cell(row.lat, row.lon, cfg.peer_resolution)
        regions = _cells_gdf(h3.grid_disk(centre, cfg.peer_rings))
        near = _join(regions, features).index.get_level_values(1).unique()
        if not set(near).intersection(hidden):
            continue
        local = _masked(features.loc[sorted(near)], hidden, keep)
        embedder = ContextualCountEmbedder(
            H3Neighbourhood(regions),
            cfg.peer_rings,
            expected_output_features=tag_filter(),
            count_subcategories=True,
            num_of_multiprocessing_workers=1,
        )
        expected = embedder.transform(regions, local, _join(regions, local)).loc[centre]
        expected = expected.reindex(peers.columns["srai_contextual_counts"]).fillna(0.0).to_numpy(float)
        np.testing.assert_allclose(fast[i], expected, rtol=0, atol=1e-9, err_msg=str(row.label_id))
        assert np.array_equal(fast[i] == 0, np.abs(expected) < 1e-12), (
            f"{row.label_id}: what srai counts 0 is exactly 0"
        )
        checked += 1
    assert checked >= 5, "labels whose object srai counts"
