"""The report's figures: projections with thumbnails, random walks, interpolation, arithmetic, transport LDA.

Each function takes the loaded Space (explore/space.py), writes one PNG and returns what the report
says about it (numbers for the text and MLflow). All randomness comes from one seeded Generator per figure.
Tiles are the encoder's own view (angle 0, no shift), composited to RGB; every figure carries the ODbL
attribution.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loc2vec.core.config import LabelConfig
from loc2vec.core.geo import haversine_m
from loc2vec.evaluation.labels import LabelSource, transport_labels
from loc2vec.explore.space import Space, Tiles
from loc2vec.raster.preview import ATTRIBUTION, font

log = logging.getLogger(__name__)
THUMB = 56  # thumbnail side in pixels in the projection plots
STRIP = 112  # tile side in pixels in walk, interpolation and arithmetic strips

# (a, b, c): a − b + c, written "a + c − b"; weights sum to 1, so the result does not depend on the origin.
ANALOGIES: tuple[tuple[str, str, str], ...] = (
    ("residential", "farmland", "river"),
    ("town centre", "residential", "forest"),
    ("farmland", "forest", "major road"),
    ("industrial", "major road", "rail"),
)
INTERPOLATIONS: tuple[tuple[str, str], ...] = (
    ("forest", "town centre"),
    ("farmland", "industrial"),
    ("river", "residential"),
)
WALK_SEEDS: tuple[str, ...] = ("town centre", "residential", "forest", "farmland", "river", "major road")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.text(0.995, 0.005, ATTRIBUTION, ha="right", va="bottom", fontsize=8, color="#444")
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _thumb(rgb: np.ndarray, size: int = THUMB) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))


# ---------------------------------------------------------------- projections (figures 15–16)


def sample_distinct(space: Space, n: int, rng: np.random.Generator) -> np.ndarray:
    """Cell indices of up to n distinct embeddings, drawn without replacement."""
    reps = space.distinct
    return np.sort(rng.choice(reps, size=min(n, len(reps)), replace=False))


def grid_picks(xy: np.ndarray, grid: int) -> np.ndarray:
    """Positions in xy nearest to the nodes of a grid×grid lattice over its extent (each at most once)."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    norm = (xy - lo) / span
    nodes = (np.arange(grid) + 0.5) / grid
    picks: list[int] = []
    for gy in nodes:
        for gx in nodes:
            d = np.hypot(norm[:, 0] - gx, norm[:, 1] - gy)
            j = int(np.argmin(d))
            if d[j] < 0.75 / grid and j not in picks:
                picks.append(j)
    return np.asarray(picks, dtype=int)


def _scatter_with_thumbs(ax, xy: np.ndarray, colours: np.ndarray, cells: np.ndarray, tiles: Tiles, grid: int) -> int:
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=6, linewidths=0)
    picks = grid_picks(xy, grid)
    for j in picks:
        box = AnnotationBbox(
            OffsetImage(_thumb(tiles.rgb(int(cells[j]))), zoom=1.0),
            tuple(xy[j]),
            frameon=True,
            pad=0.1,
            bboxprops={"edgecolor": colours[j], "linewidth": 1.5},
        )
        ax.add_artist(box)
    return len(picks)


def pca_figures(space: Space, tiles: Tiles, out: Path, n: int, grid: int, seed: int) -> dict[str, Any]:
    """2-D and 3-D PCA of distinct embeddings, coloured by their PCA RGB, with tile thumbnails."""
    plt = _plt()
    rng = np.random.default_rng([seed, 15])
    cells = sample_distinct(space, n, rng)
    comps = space.pca.transform(space.emb[cells])
    colours = space.rgb[cells]
    ev = space.explained

    fig, ax = plt.subplots(figsize=(12, 10))
    shown = _scatter_with_thumbs(ax, comps[:, :2], colours, cells, tiles, grid)
    ax.set_xlabel(f"PC1 ({ev[0]:.0%} of the variance)")
    ax.set_ylabel(f"PC2 ({ev[1]:.0%})")
    ax.set_title(f"{space.region}: {len(cells):,} distinct embeddings, PCA 2-D (colour = PC1–3 as RGB)")
    fig.tight_layout()
    _save(fig, out / "pca_2d.png")

    fig = plt.figure(figsize=(12, 10))
    ax = fig.add_subplot(projection="3d")
    ax.scatter(comps[:, 0], comps[:, 1], comps[:, 2], c=colours, s=5, linewidths=0, depthshade=False)
    ax.view_init(elev=22, azim=-58)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_zlabel(f"PC3 ({ev[2]:.0%})")
    ax.set_title(f"{space.region}: PCA 3-D ({ev[:3].sum():.0%} of the variance)")
    fig.tight_layout()
    shown3 = _thumbs_3d(fig, ax, comps, colours, cells, tiles, max(3, grid - 2))
    _save(fig, out / "pca_3d.png")
    return {
        "points": len(cells),
        "thumbnails_2d": shown,
        "thumbnails_3d": shown3,
        "explained_variance": [round(float(v), 4) for v in ev],
    }


def _thumbs_3d(fig, ax, comps: np.ndarray, colours: np.ndarray, cells: np.ndarray, tiles: Tiles, grid: int) -> int:
    """Thumbnails at the 3-D points nearest a grid over their on-screen projection."""
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage
    from mpl_toolkits.mplot3d import proj3d

    fig.canvas.draw()  # fixes the projection matrix
    x2, y2, _ = proj3d.proj_transform(comps[:, 0], comps[:, 1], comps[:, 2], ax.get_proj())
    xy = np.column_stack([x2, y2])
    picks = grid_picks(xy, grid)
    for j in picks:
        box = AnnotationBbox(
            OffsetImage(_thumb(tiles.rgb(int(cells[j])), 48), zoom=1.0),
            (x2[j], y2[j]),
            xycoords="data",
            frameon=True,
            pad=0.1,
            bboxprops={"edgecolor": colours[j], "linewidth": 1.5},
        )
        ax.add_artist(box)
    return len(picks)


def tsne_figure(
    space: Space, tiles: Tiles, out: Path, n: int, perplexity: float, grid: int, seed: int
) -> dict[str, Any]:
    """2-D t-SNE of distinct embeddings with thumbnails: the local structure PCA flattens."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    plt = _plt()
    rng = np.random.default_rng([seed, 16])
    cells = sample_distinct(space, n, rng)
    perplexity = float(min(perplexity, max(2.0, (len(cells) - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(1):  # OpenMP threads spin-wait on a busy shared CPU: 1 thread was 8× faster at load 7
        xy = tsne.fit_transform(space.emb[cells])
    fig, ax = plt.subplots(figsize=(12, 10))
    shown = _scatter_with_thumbs(ax, xy, space.rgb[cells], cells, tiles, grid)
    ax.set_title(
        f"{space.region}: t-SNE of {len(cells):,} distinct embeddings (perplexity {perplexity:g}; colour = PCA RGB)"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    _save(fig, out / "tsne.png")
    return {"points": len(cells), "thumbnails": shown, "perplexity": perplexity}


# ---------------------------------------------------------------- strips (figures 20–22)


@dataclass
class StripCell:
    cell: int
    caption: str


def strip_sheet(rows: Sequence[tuple[str, Sequence[StripCell | str]]], tiles: Tiles, title: str) -> Image.Image:
    """Rows of tiles (or operator strings such as "+"), each row with a label above it."""
    from PIL import ImageDraw

    pad, label_h, cap_h, head_h, foot_h, op_w = 6, 18, 30, 28, 20, 28
    width = max(sum(STRIP + pad if isinstance(c, StripCell) else op_w for c in cells) for _, cells in rows) + pad
    width = max(width, int(font(15).getlength(title)) + 2 * pad)
    height = head_h + len(rows) * (label_h + STRIP + cap_h) + foot_h
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 5), title, fill=(0, 0, 0), font=font(15))
    small = font(11)
    y = head_h
    for label, cells in rows:
        draw.text((pad, y + 2), label, fill=(20, 20, 120), font=font(12))
        x, y_img = pad, y + label_h
        for c in cells:
            if isinstance(c, str):
                draw.text((x + 6, y_img + STRIP // 2 - 10), c, fill=(0, 0, 0), font=font(20))
                x += op_w
                continue
            sheet.paste(Image.fromarray(tiles.rgb(c.cell)).resize((STRIP, STRIP), Image.BILINEAR), (x, y_img))
            draw.rectangle((x - 1, y_img - 1, x + STRIP, y_img + STRIP), outline=(150, 150, 150))
            for k, line in enumerate(c.caption.split("\n")[:2]):
                draw.text((x, y_img + STRIP + 2 + 13 * k), line, fill=(40, 40, 40), font=small)
            x += STRIP + pad
        y += label_h + STRIP + cap_h
    draw.text((pad, sheet.height - foot_h + 3), ATTRIBUTION, fill=(60, 60, 60), font=small)
    return sheet


def random_walk(space: Space, start: int, steps: int, k: int, min_m: float, rng: np.random.Generator) -> list[int]:
    """Cells of a walk: each step jumps to one of the k nearest distinct embeddings whose cell is at least
    min_m from every cell already on the walk (overlapping tiles would make the walk merely crawl)."""
    path = [start]
    pos_of = {int(c): j for j, c in enumerate(space.distinct)}
    used = {pos_of.get(start, -1)}
    for _ in range(steps - 1):
        here = path[-1]
        nxt = None
        for fetch in (256, 4096):
            _, ids = space.nearest(space.emb[here], fetch)
            cand = [int(j) for j in ids[0] if j >= 0 and int(j) not in used]
            cells = space.distinct[cand]
            far = np.ones(len(cells), dtype=bool)
            for p in path:
                far &= haversine_m(space.lat[p], space.lon[p], space.lat[cells], space.lon[cells]) >= min_m
            options = [j for j, ok in zip(cand, far, strict=True) if ok][:k]
            if options:
                nxt = int(rng.choice(options))
                break
        if nxt is None:
            break
        used.add(nxt)
        path.append(int(space.distinct[nxt]))
    return path


def walks_figure(
    space: Space, tiles: Tiles, out: Path, walks: int, steps: int, k: int, min_m: float, seed: int
) -> dict[str, Any]:
    """Random walks through the k-nearest-neighbour graph, one strip each (figure 20)."""
    rng = np.random.default_rng([seed, 20])
    rows, hops_km, hops_d = [], [], []
    for w in range(walks):
        concept = WALK_SEEDS[w % len(WALK_SEEDS)]
        start = int(rng.choice(space.top(concept, 25)))
        path = random_walk(space, start, steps, k, min_m, rng)
        cells: list[StripCell] = [StripCell(path[0], "start")]
        for a, b in zip(path[:-1], path[1:], strict=False):
            d = float(np.linalg.norm(space.emb[a] - space.emb[b]))
            km = float(haversine_m(space.lat[a], space.lon[a], space.lat[b], space.lon[b])) / 1000
            hops_d.append(d)
            hops_km.append(km)
            cells.append(StripCell(b, f"d={d:.2f}\n{km:.1f} km away"))
        rows.append((f"walk {w + 1}, from a {concept} tile ({len(path) - 1} steps)", cells))
    title = (
        f"{space.region}: random walks, each step one of the {k} nearest embeddings ≥ {min_m:g} m from the walk so far"
    )
    strip_sheet(rows, tiles, title).save(out / "walks.png")
    return {
        "walks": len(rows),
        "steps": len(hops_d),
        "median_step_distance": round(float(np.median(hops_d)), 4) if hops_d else None,
        "median_step_km": round(float(np.median(hops_km)), 3) if hops_km else None,
    }


def interpolation_figure(space: Space, tiles: Tiles, out: Path, steps: int) -> dict[str, Any]:
    """Straight lines between two embeddings, each point mapped to the nearest real tile (figure 21)."""
    rows, distinct_counts = [], []
    for a_name, b_name in INTERPOLATIONS:
        a, b = space.exemplar(a_name), space.exemplar(b_name)
        cells = []
        for t in np.linspace(0.0, 1.0, steps):
            v = (1 - t) * space.emb[a] + t * space.emb[b]
            d, ids = space.nearest(v, 1)
            cells.append(StripCell(int(space.distinct[ids[0, 0]]), f"t={t:.2f}\nd={d[0, 0]:.2f}"))
        distinct_counts.append(len({c.cell for c in cells}))
        rows.append((f"{a_name} → {b_name}", cells))
    title = f"{space.region}: interpolation between embeddings, each step's nearest real tile (d = its distance)"
    strip_sheet(rows, tiles, title).save(out / "interpolation.png")
    return {"pairs": [f"{a} → {b}" for a, b in INTERPOLATIONS], "distinct_tiles_per_row": distinct_counts}


def arithmetic_figure(space: Space, tiles: Tiles, out: Path) -> dict[str, Any]:
    """a + c − b for concept exemplars, mapped to the nearest real tile other than the operands (figure 22)."""
    rows, results = [], []
    for a_name, b_name, c_name in ANALOGIES:
        a, b, c = (space.exemplar(n) for n in (a_name, b_name, c_name))
        v = space.emb[a] - space.emb[b] + space.emb[c]
        operands = {a, b, c}
        d, ids = space.nearest(v, 8)
        best = next(int(space.distinct[j]) for j in ids[0] if int(space.distinct[j]) not in operands)
        dist = float(np.linalg.norm(space.emb[best] - v))
        rows.append(
            (
                f"{a_name} + {c_name} − {b_name}",
                [
                    StripCell(a, a_name),
                    "+",
                    StripCell(c, c_name),
                    "−",
                    StripCell(b, b_name),
                    "=",
                    StripCell(best, f"nearest\nd={dist:.2f}"),
                ],
            )
        )
        results.append(
            {
                "expression": f"{a_name} + {c_name} - {b_name}",
                "h3_cell": str(space.h3_cell[best]),
                "distance": round(dist, 4),
            }
        )
    title = f"{space.region}: arithmetic on embeddings, the result mapped to the nearest real tile"
    strip_sheet(rows, tiles, title).save(out / "arithmetic.png")
    return {"expressions": results}


# ---------------------------------------------------------------- transport points (figure 17)


def transport_points(space: Space, labels_cfg: LabelConfig, source: LabelSource) -> tuple[np.ndarray, np.ndarray]:
    """(cell indices, modes) of the evaluation's transport label points whose H3 cell is embedded."""
    import h3

    labels = transport_labels(space.region, labels_cfg, source)
    pos = {c: i for i, c in enumerate(space.h3_cell)}
    cells = [
        h3.latlng_to_cell(float(a), float(b), space.h3_resolution)
        for a, b in zip(labels["lat"], labels["lon"], strict=True)
    ]
    keep = [(pos[c], m) for c, m in zip(cells, labels["label"], strict=True) if c in pos]
    if not keep:
        return np.empty(0, dtype=int), np.empty(0, dtype=object)
    idx, modes = zip(*keep, strict=True)
    return np.asarray(idx, dtype=int), np.asarray(modes, dtype=object)


def lda_figure(space: Space, out: Path, seed: int, labels_cfg: LabelConfig, source: LabelSource) -> dict[str, Any]:
    """2-D LDA of the embeddings at transport points, coloured by mode, with a cross-validated accuracy."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    idx, modes = transport_points(space, labels_cfg, source)
    classes, counts = np.unique(modes, return_counts=True)
    if len(classes) < 3 or counts.min() < 5:
        return {"skipped": f"too few transport modes with points: {dict(zip(classes, counts.tolist(), strict=True))}"}
    x = space.emb[idx]
    lda = LinearDiscriminantAnalysis(n_components=2)
    xy = lda.fit_transform(x, modes)
    folds = StratifiedKFold(n_splits=min(5, int(counts.min())), shuffle=True, random_state=seed)
    acc = float(cross_val_score(LinearDiscriminantAnalysis(), x, modes, cv=folds).mean())
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 8))
    for k, mode in enumerate(classes):
        m = modes == mode
        ax.scatter(xy[m, 0], xy[m, 1], s=12, alpha=0.7, color=plt.cm.tab10(k), label=f"{mode} ({m.sum()})")
    ax.legend(title="transport mode (points)")
    ax.set_xlabel("LD1")
    ax.set_ylabel("LD2")
    ax.set_title(
        f"{space.region}: LDA of embeddings at transport points "
        f"(LDA {folds.n_splits}-fold accuracy {acc:.0%}, chance {1 / len(classes):.0%})"
    )
    fig.tight_layout()
    _save(fig, out / "transport_lda.png")
    return {
        "points": int(len(idx)),
        "modes": {str(c): int(n) for c, n in zip(classes, counts, strict=True)},
        "cv_accuracy": round(acc, 4),
    }
