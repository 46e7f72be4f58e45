"""The dense embedding path (embedding/dense.py) against the per-tile reference (embedding/encode.py).

Hand-built cases check the shift-and-stitch trunk and the head at a position exactly: on a tile alone the
dense trunk *is* the encoder at every stride, and for a tile inside a larger canvas whose corner lies on
the grid, the inner 2×2 of its 4×4 trunk window is the per-tile computation (only the outer ring sees the
neighbourhood where the per-tile path sees zero padding). On the real test region, dense embeddings
agree with per-tile ones cell by cell, histograms equal per-tile's, and the result is deterministic and
does not depend on how the windows fall.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from loc2vec.core.config import EmbedConfig, ModelConfig
from loc2vec.embedding.dense import (
    DenseSettings,
    centre_features,
    centre_from_tap,
    cut_pixels,
    dense_trunk,
    dense_trunk_and_tap,
    encode_dense,
    encode_metatile,
    head_at,
    tile_corners,
    windows_at,
)
from loc2vec.training.model import Encoder, to_input

from .fixtures.project import ensure_metatiles, load_project

STRIDES = (32, 16, 8, 4, 2, 1)
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float summation order: a dilated or larger conv sums in another order


def _encoder(seed: int = 0, centre_px: int = 0, centre_source: str = "branch") -> Encoder:
    """A seeded untrained encoder whose BatchNorms are not the identity (running statistics and affine
    parameters drawn, some scales negative: a max-pool does not commute with them); with centre_px, with a
    centre (a branch of its own, or read from the trunk)."""
    torch.manual_seed(seed)
    model = Encoder(ModelConfig(centre_px=centre_px, centre_source=centre_source))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model.eval()


def _canvas(height: int, width: int, seed: int = 0) -> np.ndarray:
    """An (H, W, 12) uint8 map-like raster: mostly empty, with filled rectangles and anti-aliased noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros((height, width, 12), np.uint8)
    for _ in range(60):
        c, y, x = rng.integers(12), rng.integers(height), rng.integers(width)
        out[y : y + rng.integers(2, 60), x : x + rng.integers(2, 60), c] = rng.integers(100, 256)
    noise = rng.random((height, width, 12)) < 0.02
    out[noise] = rng.integers(1, 256, noise.sum())
    return out


def _input(array: np.ndarray) -> torch.Tensor:
    return to_input(torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0))


@pytest.mark.parametrize("stride", STRIDES)
def test_trunk_on_a_tile_alone_is_the_encoder(stride: int) -> None:
    """On a tile alone (zero padding at its edge, as the per-tile path pads) every stride's map, read every
    32/stride positions, is the encoder's 4×4 map, and the head at position (0, 0) is the embedding."""
    model = _encoder()
    tile = _input(_canvas(128, 128, seed=stride))
    with torch.no_grad():
        expected = model.features(tile)
        fmap = dense_trunk(model, tile, stride)
        step = 32 // stride
        torch.testing.assert_close(fmap[..., ::step, ::step][..., :4, :4], expected, **TOL)
        torch.testing.assert_close(head_at(model, fmap[0], np.array([0]), np.array([0]), stride), model(tile), **TOL)
    if stride == 32:
        assert fmap.shape == expected.shape


@pytest.mark.parametrize(("stride", "corner"), [(32, (96, 64)), (16, (80, 48)), (8, (72, 104)), (4, (36, 92))])
def test_tile_on_the_grid_inside_a_canvas(stride: int, corner: tuple[int, int]) -> None:
    """A tile whose corner lies on the stride's grid: the inner 2×2 of its trunk window equals the per-tile
    map (the same inputs, no padding reaches them), the outer ring differs (the per-tile path sees zero
    padding where the canvas has content), and `head_at` is the head on that window."""
    model = _encoder(seed=1)
    canvas = _canvas(320, 320, seed=2)
    y, x = corner
    assert y % stride == 0 and x % stride == 0
    with torch.no_grad():
        per_tile = model.features(_input(canvas[y : y + 128, x : x + 128]))[0]
        fmap = dense_trunk(model, _input(canvas), stride)[0]
        window = windows_at(fmap, np.array([y // stride]), np.array([x // stride]), 4, 32 // stride)[0]
        torch.testing.assert_close(window[:, 1:3, 1:3], per_tile[:, 1:3, 1:3], **TOL)
        ring = torch.ones(4, 4, dtype=torch.bool)
        ring[1:3, 1:3] = False
        assert (window[:, ring] - per_tile[:, ring]).abs().max() > 1e-3, "the ring sees the canvas"
        emb = head_at(model, fmap, np.array([y // stride]), np.array([x // stride]), stride)
        torch.testing.assert_close(emb, model.head(window[None]), **TOL)
        # bilinear with zero fractions is the snapped window; half-way is the mean of the two windows' heads' input
        zero = (np.zeros(1), np.zeros(1))
        torch.testing.assert_close(
            head_at(model, fmap, np.array([y // stride]), np.array([x // stride]), stride, zero), emb
        )
        half = head_at(
            model, fmap, np.array([y // stride]), np.array([x // stride]), stride, (np.zeros(1), np.full(1, 0.5))
        )
        nxt = windows_at(fmap, np.array([y // stride]), np.array([x // stride + 1]), 4, 32 // stride)[0]
        torch.testing.assert_close(half, model.head(((window + nxt) / 2)[None]), **TOL)


def test_config_validates_the_dense_settings() -> None:
    assert EmbedConfig().method in ("dense", "per_tile")
    assert EmbedConfig(method="per_tile", dense_stride=4, dense_position="snap", dense_window_px=512).dense_stride == 4
    for bad in ({"method": "tiles"}, {"dense_stride": 12}, {"dense_stride": 64}, {"dense_window_px": 100},
                {"dense_position": "nearest"}):  # fmt: skip
        with pytest.raises(ValidationError, match=next(iter(bad))):
            EmbedConfig(**bad)
    with pytest.raises(ValueError, match="eval mode"):
        dense_trunk(Encoder(ModelConfig()).train(), torch.zeros(1, 12, 128, 128), 8)


@pytest.fixture(scope="module")
def cells(project: Path, region: str) -> dict:
    """The test region's H3 cells at resolution 10 (as embed selects them), their metatiles and a trained encoder."""
    from loc2vec.embedding.cells import select_cells

    from .fixtures.trained import load_fixture_encoder

    p = load_project()
    cfg = p.params.embed.model_copy(update={"h3_resolution": 10})
    _, lats, lons = select_cells(region, cfg, p.params.render.radius_m, p.info)
    index = ensure_metatiles(region, lats, lons, project=p)
    return {
        "lats": lats,
        "lons": lons,
        "index": index,
        "model": load_fixture_encoder(region),
        "orchestrate": p.params.orchestrate,
    }


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_dense_agrees_with_per_tile_on_the_test_region(cells: dict) -> None:
    from loc2vec.embedding.encode import encode

    lats, lons, index, model = cells["lats"], cells["lons"], cells["index"], cells["model"]
    assert len(lats) > 300
    per_tile, per_tile_hist = encode(model, index, lats, lons, 64, progress=False)
    for settings, median, p05 in [(DenseSettings(), 0.98, 0.9), (DenseSettings(32, "snap", 512), 0.97, 0.85)]:
        emb, hist = encode_dense(
            model, index, lats, lons, settings, progress=False, cfg=cells["orchestrate"], kind="inline"
        )
        cos = _cosine(emb, per_tile)
        assert np.median(cos) >= median and np.percentile(cos, 5) >= p05, (
            settings,
            np.median(cos),
            np.percentile(cos, 5),
        )
        # the same 128² px as the cut, but where the location's and its metatile row's scales make the cut
        # repeat or skip a pixel row or column
        diff = np.abs(hist - per_tile_hist).max(axis=1)
        assert (diff == 0).mean() > 0.9 and diff.max() <= 2 * 128 / 128**2, (settings, (diff == 0).mean(), diff.max())


def test_dense_reads_each_metatile_once_without_filling_the_lru(cells: dict) -> None:
    """One task per metatile reads it once: encode_dense does not add it to the index's LRU of decompressed
    metatiles (up to tiles.host_cache_mb held for nothing), but takes one a reader before it kept."""
    import pickle

    lats, lons = cells["lats"], cells["lons"]
    index = pickle.loads(pickle.dumps(cells["index"]))  # as a task receives it: without decompressed arrays
    keys = np.unique(tile_corners(index, lats, lons)[0]).tolist()
    assert [k for k in keys if index.cached(k) is not None] == []
    kept = index.array(keys[0])
    emb, _ = encode_dense(
        cells["model"], index, lats, lons, DenseSettings(), progress=False, cfg=cells["orchestrate"], kind="inline"
    )
    assert index.cached(keys[0]) is kept
    assert [k for k in keys[1:] if index.cached(k) is not None] == []
    again, _ = encode_dense(
        cells["model"],
        cells["index"],
        lats,
        lons,
        DenseSettings(),
        progress=False,
        cfg=cells["orchestrate"],
        kind="inline",
    )
    assert emb.tobytes() == again.tobytes()


@pytest.mark.parametrize("centre", [None, "branch"], ids=["trained", "centre-branch"])
def test_bf16_embeddings_are_float32s_up_to_rounding_and_deterministic(cells: dict, centre: str | None) -> None:
    """embed.cpu_bf16: both paths under bf16 autocast give float32's embeddings up to bf16 rounding (every cell's
    cosine ≥ 0.999), the same bytes run to run, unchanged histograms, and dense agrees with per-tile as in float32
    (median cosine within 0.002)."""
    from loc2vec.embedding.encode import encode

    lats, lons, index = cells["lats"], cells["lons"], cells["index"]
    model = _encoder(2, centre_px=32, centre_source=centre) if centre else cells["model"]

    def dense(bf16: bool) -> tuple[np.ndarray, np.ndarray]:
        settings = DenseSettings(bf16=bf16)
        return encode_dense(model, index, lats, lons, settings, progress=False, cfg=cells["orchestrate"], kind="inline")

    fp32, bf16, again = dense(False), dense(True), dense(True)
    assert bf16[0].tobytes() == again[0].tobytes()
    np.testing.assert_array_equal(bf16[1], fp32[1])
    assert not np.array_equal(bf16[0], fp32[0])  # bf16 really ran
    assert _cosine(bf16[0], fp32[0]).min() >= 0.999, _cosine(bf16[0], fp32[0]).min()
    tiles_fp32, tiles_bf16 = (encode(model, index, lats, lons, 64, progress=False, bf16=b)[0] for b in (False, True))
    assert _cosine(tiles_bf16, tiles_fp32).min() >= 0.999, _cosine(tiles_bf16, tiles_fp32).min()
    tiles_fp32_median, tiles_bf16_median = (
        np.median(_cosine(d[0], t)) for d, t in ((fp32, tiles_fp32), (bf16, tiles_bf16))
    )
    assert abs(tiles_bf16_median - tiles_fp32_median) <= 0.002, (tiles_bf16_median, tiles_fp32_median)


@pytest.mark.parametrize(
    "centre", [None, "branch", "trunk", "pooled"], ids=["trunk", "centre-branch", "centre-from-trunk", "pooled-centre"]
)
def test_dense_is_deterministic_and_independent_of_the_windows(cells: dict, centre: str | None) -> None:
    lats, lons, index = cells["lats"], cells["lons"], cells["index"]
    model = _encoder(2, centre_px=32, centre_source=centre) if centre else cells["model"]

    def run(settings: DenseSettings) -> np.ndarray:
        return encode_dense(model, index, lats, lons, settings, progress=False, cfg=cells["orchestrate"], kind="inline")

    first, again = run(DenseSettings()), run(DenseSettings())
    assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()
    small = run(DenseSettings(window_px=256))  # more, smaller windows: the same embeddings up to summation order
    np.testing.assert_allclose(small[0], first[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(small[1], first[1])
    keys, xs, ys = tile_corners(index, lats, lons)
    assert len(np.unique(keys)) >= 2, "several metatiles: several tasks"


@pytest.mark.parametrize("source", ("branch", "pooled"))
@pytest.mark.parametrize("stride", (32, 16, 8))
def test_centre_branch_on_a_tile_alone_is_the_encoder(stride: int, source: str) -> None:
    """With a centre branch (convs of its own, or a pooled centre's 1×1 layers), the dense trunk's window and the
    centre features of the tile's own central crop, through the head, are the encoder's embedding; the centre
    features are `representation`'s centre part."""
    model = _encoder(0, centre_px=32, centre_source=source)
    canvas = _canvas(128, 128, seed=3)
    tile = _input(canvas)
    with torch.no_grad():
        centre = centre_features(model, canvas, np.array([0]), np.array([0]))
        torch.testing.assert_close(centre, model.representation(tile)[:, 32:], **TOL)
        fmap = dense_trunk(model, tile, stride)[0]
        torch.testing.assert_close(
            head_at(model, fmap, np.array([0]), np.array([0]), stride, None, centre), model(tile), **TOL
        )
        with pytest.raises(ValueError, match="centre branch"):
            head_at(model, fmap, np.array([0]), np.array([0]), stride)  # its features are needed


@pytest.mark.parametrize("stride", (32, 16, 8, 4))
def test_centre_from_the_trunk_on_a_tile_alone_is_the_encoder(stride: int) -> None:
    """With the centre read from the trunk, the dense trunk's map after three blocks holds it: the mean of its
    4×4 taps at the tile's central 32 px, through the head with the trunk's window, is the encoder's embedding."""
    model = _encoder(0, centre_px=32, centre_source="trunk")
    tile = _input(_canvas(128, 128, seed=5))
    with torch.no_grad():
        fmap, tap, tap_step = dense_trunk_and_tap(model, tile, stride, 3)
        assert tap_step == min(stride, 8)
        at = np.array([48 / tap_step])
        centre = centre_from_tap(model, tap[0], tap_step, at, at, "snap")
        torch.testing.assert_close(centre, model.representation(tile)[:, 32:], **TOL)
        torch.testing.assert_close(centre_from_tap(model, tap[0], tap_step, at, at, "bilinear"), centre, **TOL)
        emb = head_at(model, fmap[0], np.array([0]), np.array([0]), stride, None, centre)
        torch.testing.assert_close(emb, model(tile), **TOL)


def test_centre_from_the_trunk_inside_a_canvas_is_the_per_tile_centre() -> None:
    """Inside a canvas (real neighbourhood, no zero padding near the centre) the map's centre is the per-tile path's
    exactly where the tile's corner lies on the 8 px grid, and between grid corners the bilinear mix of theirs: the
    encoder's 8 px margin makes the per-tile centre independent of what lies beyond its tile."""
    model = _encoder(3, centre_px=32, centre_source="trunk")
    canvas = _canvas(320, 320, seed=6)

    def per_tile(y: int, x: int) -> torch.Tensor:
        return model.representation(_input(canvas[y : y + 128, x : x + 128]))[0, 32:]

    with torch.no_grad():
        _, tap, step = dense_trunk_and_tap(model, _input(canvas), 16, 3)
        for y, x in [(0, 0), (64, 152), (184, 96)]:  # on the grid: exact
            got = centre_from_tap(model, tap[0], step, np.array([(y + 48) / 8]), np.array([(x + 48) / 8]), "bilinear")
            torch.testing.assert_close(got[0], per_tile(y, x), **TOL)
        y, x = 66, 101  # between (64, 96) and (72, 104): fractions 2/8 and 5/8
        got = centre_from_tap(model, tap[0], step, np.array([(y + 48) / 8]), np.array([(x + 48) / 8]), "bilinear")[0]
        mix = 0.75 * (0.375 * per_tile(64, 96) + 0.625 * per_tile(64, 104)) + 0.25 * (
            0.375 * per_tile(72, 96) + 0.625 * per_tile(72, 104)
        )
        torch.testing.assert_close(got, mix, **TOL)
        snapped = centre_from_tap(model, tap[0], step, np.array([(y + 48) / 8]), np.array([(x + 48) / 8]), "snap")
        torch.testing.assert_close(snapped[0], per_tile(64, 104), **TOL)
        # encode_metatile reads it so: a cell on the grid gets the per-tile centre through the head
        emb, _ = encode_metatile(model, canvas, np.array([96.0]), np.array([64.0]), DenseSettings(window_px=128))
        fmap = dense_trunk(model, _input(canvas), 16)[0]
        expected = head_at(model, fmap, np.array([64 // 16]), np.array([96 // 16]), 16, None, per_tile(64, 96)[None])
        torch.testing.assert_close(torch.from_numpy(emb), expected, **TOL)


@pytest.mark.parametrize("source", ("branch", "pooled"))
def test_centre_features_cut_the_exact_crop_and_pad_with_zeros(source: str) -> None:
    """Inside a canvas the centre features are the branch on the tile's central crop, at any pixel (no grid);
    where the crop leaves the array it reads zeros, as the per-tile cut does beyond a metatile."""
    model = _encoder(1, centre_px=32, centre_source=source)
    canvas = _canvas(300, 300, seed=4)
    xs, ys = np.array([0, 37, 101, 172]), np.array([5, 0, 63, 172])
    with torch.no_grad():
        got = centre_features(model, canvas, xs, ys, batch=3)  # batches of 3: a batch edge crossed
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            expected = model.representation(_input(canvas[y : y + 128, x : x + 128]))[0, 32:]
            torch.testing.assert_close(got[i], expected, **TOL)
        padded = np.zeros((400, 400, 12), np.uint8)
        padded[100:, 100:] = canvas
        # corners whose central crop (px 48–79 of the tile) reaches beyond the canvas's top-left edge
        edge = centre_features(model, canvas, np.array([-60, -50]), np.array([-55, 10]))
        inside = centre_features(model, padded, np.array([40, 50]), np.array([45, 110]))
        torch.testing.assert_close(edge, inside, **TOL)


@pytest.mark.parametrize("source", ("branch", "pooled"))
def test_centre_features_on_the_test_region_are_the_per_tile_paths(cells: dict, source: str) -> None:
    """On the real metatiles, the centre features `encode_dense` gives the head are the per-tile path's (the
    branch on the cut tile's central crop) wherever the cut reads the same pixels: the crop is cut at the
    tile's exact pixel, not snapped to the trunk's grid. (How far the whole embedding moves is the trunk's
    padding and position, measured with a trained centre encoder by `loc2vec bench embed`.)"""
    from loc2vec.raster.cutter import cut_tiles

    lats, lons, index = cells["lats"], cells["lons"], cells["index"]
    model = _encoder(2, centre_px=32, centre_source=source)
    keys, xs, ys = tile_corners(index, lats, lons)
    px, py = cut_pixels(xs, ys)
    n = len(lats)
    tiles = cut_tiles(index, lats, lons, np.zeros(n), np.zeros((n, 2)), device="cpu")
    with torch.no_grad():
        expected = model.representation(to_input(tiles))[:, 32:]
        got = torch.empty_like(expected)
        for key in np.unique(keys).tolist():
            sel = np.flatnonzero(keys == key)
            got[sel] = centre_features(model, index.array(key), px[sel], py[sel])
    exact = ((got - expected).abs() <= 1e-4 + 1e-4 * expected.abs()).all(dim=1).float().mean()
    assert exact > 0.9, exact  # the rest: the cut repeats or skips a pixel row or column (see the histograms)
    assert (_cosine(got.numpy(), expected.numpy()) > 0.99).all()
