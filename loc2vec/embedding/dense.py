"""Dense embedding: the encoder's convolutional trunk once per metatile window, its dense head at every cell.

Why: neighbouring cells' tiles overlap about 19-fold (a 128² px tile against a ~880 px H3 cell at
resolution 11), so cutting and encoding one tile per cell (embedding/encode.py, the per-tile path)
computes every convolution ~19 times over. The trunk (5 × [3×3 conv → 2×2 max-pool → BN → LeakyReLU],
then two 1×1 convs) is translation-equivariant with a stride of B = 32 px (one halving per pool): run
over a large window, its output at position (i, j) is what it computes for the B×B block at input px
(B·i, B·j), and a tile whose top-left corner lies on that grid is a 4×4 window of it. The dense head
(flatten → 192 → 16) then runs once per cell, on the cell's window.

**Positions** (``embed.dense_stride``, ``embed.dense_position``). A cell's tile corner (where the
per-tile path's cut starts, in metatile px) lies on the B-px grid only by chance. The last pools are
run with stride 1 instead of 2 and the convs after them dilated (shift-and-stitch, "à trous"), so the
trunk's output is sampled every ``dense_stride`` px: every phase of the pooling grid at that step, in
one pass, for a fraction of what running the trunk once per phase would cost (stride 16 costs what 32
does: only the last pool changes; 8 dilates the last conv too, ~1.25× the FLOPs and measured ~1.6× the
time, 4 ~2.7× the FLOPs). The corner is then snapped to the nearest grid position (``snap``: off by
≤ stride/2 px per axis), or the four 4×4 windows around it are bilinearly interpolated before the head
(``bilinear``). The head's taps are B/stride grid positions apart. Measured on Liechtenstein
(benchmarks/README.md): the agreement with per-tile is limited by the padding, not the position (median
cosine 0.992 at every stride; the 5th percentile 0.91 at 32 snapped, 0.944–0.949 at 16 or 8 bilinear),
so the default is 16, bilinear.

**Padding.** The per-tile path pads every 3×3 conv with zeros at the tile's edge; over a window the
convs see the real neighbourhood instead. The zero padding reaches one position inward per conv at
that conv's own resolution, and each pool halves it back to one: so for a tile on the grid, the inner
2×2 of its 4×4 trunk window is the same computation on both paths (equal up to float summation order),
and only the outer ring of 12 positions differs (tests/test_dense.py asserts both). How much that moves
the embedding is measured (`loc2vec bench embed`: ``dense.padding_cosine_*``, per-tile at the snapped
corner vs dense there, apart from the snapping).

**Centre branch** (``model.centre_px`` > 0, training/model.py). The branch reads each tile's central 32 px,
zero-padded at the crop's edge in training and on the per-tile path; a map over the real neighbourhood would
change 12 of the 16 positions it averages. Its crops are cut at each tile's exact pixel instead (no snapping,
no interpolation) and run through the branch as the per-tile path runs them (`centre_features`): the same
numbers wherever the cut reads the same pixels (tests/test_dense.py), for about what a dense map would cost,
since the crops barely overlap (32² px against a cell's ~880). The head reads the trunk's window, then them.
Measured on Liechtenstein (benchmarks/README.md): the branch adds ~50% to the dense path's time (18.7 s
against 12.5 s for 89,492 cells), by its FLOPs ~5% to the per-tile path's.

**Centre read from the trunk** (``model.centre_source: trunk``). The encoder averages its trunk's own map after
three blocks over the tile's central 32 px, and trains its separate centre views on crops with 8 px of margin,
so that no zero padding reaches the average: the dense path reads it off the map the trunk computes anyway
(`dense_trunk_and_tap`, `centre_from_tap`), at the centre's exact position on the 8 px grid, snapped or
bilinearly interpolated between grid positions as the trunk's windows are. On the grid it is the per-tile
path's centre exactly (tests/test_dense.py); its cost is a gather.

**Pooled centre** (``model.centre_source: pooled``). Its crop is cut at the exact pixel as the branch's is; the
average over each 8 px block is taken on exact integer sums of the uint8 crop (`_block_means`), then the 1×1 layers:
per-tile's numbers up to float summation order, for a few µs per cell (measured on Liechtenstein in one sitting:
~8% of the dense path's time, where the branch's convs take ~40%).

**bf16** (``embed.cpu_bf16``: false by default, so that one model embeds the same bytes on any machine of one
vendor; ``auto`` is bf16 where the CPU has its own kernels). The convolutions (the trunk's and the centre's) run
under bf16 autocast and their maps are read back as float32; the interpolation and the head (~1% of the
multiply-adds) stay float32, so the embedding is not rounded to bf16's 8-bit mantissa. The per-tile path does the
same (`Encoder.forward_with_bf16_convs`). Measured on Liechtenstein (Zen 5): dense 1.5–2.0× the pinned float32's
cells/s, per-tile 1.4–1.8×, so the ratio between them does not move; cosine to float32 over all 89,492 cells: median
0.99999, minimum 0.9999.

**Windows.** A metatile's cells are processed in windows of ``embed.dense_window_px`` px of tile
corners (fitted to the cells they hold, so sparse edges cost little), each with a halo of B px: the
trunk's reach beyond a tile is 1+2+4+8+16 = 31 px, so the window's own zero padding never reaches a
result, and a cell's embedding does not depend on how the windows fall (up to float summation order).
A 2336² px × 12 metatile in float32 is 262 MB before the first conv: a 2048 px window (a whole metatile
core, the default) adds ~0.8 GB to a task's peak memory, 1024 px ~0.25 GB, 512 px ~0.12 GB; larger
windows cost less time (one halo each, and fewer, larger convolutions).

**Histograms** (the ``histogram`` baseline: non-zero fraction per channel of the cell's tile) come from
column prefix sums of each window, over the same 128×128 px the per-tile cut reads when the Mercator
scale of the location and of its metatile row agree (|k/k_row − 1| ≤ 3·10⁻⁴: the cut then repeats or
skips one pixel column or row in a few tiles in a hundred; `loc2vec bench embed` reports how many).

Deterministic on CPU: the windows are a function of the cells and the settings only, so every task
runner (one task per metatile) computes the same windows; like the per-tile path, the bytes depend on
torch's thread count (see embedding/encode.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from loc2vec.core.config import EmbedConfig, OrchestrateConfig
from loc2vec.core.numerics import cpu_bf16_enabled
from loc2vec.orchestration.runners import RunnerKind, map_tasks, runner_kind
from loc2vec.raster.channels import N_CHANNELS
from loc2vec.raster.cutter import tile_affines
from loc2vec.raster.metatiles import MetatileIndex, check_locations
from loc2vec.raster.render import RenderError
from loc2vec.training.model import Encoder, to_input

Position = Literal["snap", "bilinear"]


@dataclass(frozen=True)
class DenseSettings:
    """How the dense path samples the trunk: grid step (px), snap or interpolate, window side (px of corners)."""

    stride: int = 16
    position: Position = "bilinear"
    window_px: int = 2048
    bf16: bool = False  # the convolutions under bf16 autocast (embed.cpu_bf16); their maps read back as float32

    @classmethod
    def from_config(cls, cfg: EmbedConfig) -> DenseSettings:
        """params `embed:` dense_stride, dense_position, dense_window_px, cpu_bf16 (`auto` unresolved: as
        `cpu_bf16_enabled` says in this process)."""
        return cls(
            stride=cfg.dense_stride,
            position=cfg.dense_position,
            window_px=cfg.dense_window_px,
            bf16=cpu_bf16_enabled(cfg.cpu_bf16),
        )


def block_px(model: Encoder) -> int:
    """The trunk's stride B (px): one halving per conv block."""
    return 2 ** len(model.cfg.conv_channels)


def _check(model: Encoder, stride: int) -> None:
    if model.training:
        raise ValueError("the dense path needs the encoder in eval mode (dropout off, BatchNorm's running stats)")
    block = block_px(model)
    if stride < 1 or block % stride:
        raise ValueError(f"dense stride {stride} must divide the trunk's stride {block} (a power of two)")


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift) of an eval-mode BatchNorm with running statistics, or None if it has none."""
    if bn.running_mean is None or bn.running_var is None:
        return None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _plan(model: Encoder) -> list[tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]]:
    """The trunk's modules in order, each conv with its weight in channels_last (prepared once per call, not per
    window) and, when it is followed by max-pool → BatchNorm with positive scales, that BatchNorm folded into
    it (w·a, b·a + shift: a positive per-channel affine map commutes with the max, so the pool then the
    BatchNorm equal the pool of the folded conv up to float rounding; a pass over each map saved). A
    BatchNorm with a scale ≤ 0 stays where it is (the max does not commute with it)."""
    mods = [m for m in model.features if not isinstance(m, nn.Dropout2d)]  # the identity in eval mode
    plan: list[tuple[nn.Module, torch.Tensor | None, torch.Tensor | None]] = []
    i = 0
    while i < len(mods):
        m = mods[i]
        if not isinstance(m, nn.Conv2d):
            plan.append((m, None, None))
            i += 1
            continue
        if m.stride != (1, 1) or m.dilation != (1, 1) or m.groups != 1:
            raise ValueError(f"unsupported conv for the dense path: {m}")
        weight, bias = m.weight.detach(), None if m.bias is None else m.bias.detach()
        nxt = mods[i + 1 : i + 3]
        affine = (
            _bn_affine(nxt[1])
            if len(nxt) == 2 and isinstance(nxt[0], nn.MaxPool2d) and isinstance(nxt[1], nn.BatchNorm2d)
            else None
        )
        if affine is not None and bool((affine[0] > 0).all()):
            scale, shift = affine
            weight = weight * scale[:, None, None, None]
            bias = shift if bias is None else bias * scale + shift
            plan += [(m, weight.contiguous(memory_format=torch.channels_last), bias), (nxt[0], None, None)]
            i += 3
            continue
        plan.append((m, weight.contiguous(memory_format=torch.channels_last), bias))
        i += 1
    return plan


def _max2(x: torch.Tensor, d: int, stride: int) -> torch.Tensor:
    """The 2×2 max over taps `d` apart of a channels_last map, sampled every `stride` (1 or 2) positions: the
    maxima of four strided views (exact; measured 1.6× faster than max_pool2d on a 16-channel map, slower from
    32 channels on)."""
    h, w = x.shape[-2] - d, x.shape[-1] - d
    if stride == 2:  # d == 1: max_pool2d's windows, floor mode
        h, w = x.shape[-2] // 2 * 2 - 1, x.shape[-1] // 2 * 2 - 1
    out = torch.maximum(x[..., 0:h:stride, 0:w:stride], x[..., 0:h:stride, d : d + w : stride])
    torch.maximum(out, x[..., d : d + h : stride, 0:w:stride], out=out)
    torch.maximum(out, x[..., d : d + h : stride, d : d + w : stride], out=out)
    return out.contiguous(memory_format=torch.channels_last)


def _layer(
    m: nn.Module,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    x: torch.Tensor,
    spacing: int,
    step: int,
    stride: int,
) -> tuple[torch.Tensor, int, int]:
    """One trunk module over a map whose grid positions are `spacing` px apart, sampled every `step` px."""
    if isinstance(m, nn.Conv2d):
        d = spacing // step
        pad = (m.padding[0] * d, m.padding[1] * d) if isinstance(m.padding, tuple) else m.padding
        return F.conv2d(x, weight, bias, padding=pad, dilation=d), spacing, step
    if isinstance(m, nn.MaxPool2d):
        if m.kernel_size not in (2, (2, 2)) or m.stride not in (2, (2, 2)) or m.padding not in (0, (0, 0)):
            raise ValueError(f"unsupported pool for the dense path: {m}")
        if 2 * spacing <= stride:  # few channels: max_pool2d's channels_last kernel is slow on them
            y = _max2(x, 1, 2) if x.shape[1] < 32 else F.max_pool2d(x, 2)
            return y, 2 * spacing, 2 * spacing
        # a 2×2 max at stride 1 over taps d apart (max_pool2d with dilation: ~7× slower)
        return _max2(x, spacing // step, 1), 2 * spacing, step
    if isinstance(m, nn.LeakyReLU):
        return F.leaky_relu_(x, m.negative_slope), spacing, step
    if isinstance(m, nn.BatchNorm2d):
        return m(x), spacing, step  # eval: running statistics
    raise ValueError(f"unsupported module for the dense path: {m}")


def dense_trunk(model: Encoder, x: torch.Tensor, stride: int) -> torch.Tensor:
    """`model.features` over a large (N, C, H, W) input, sampled every `stride` input px.

    Output position (i, j) holds the trunk's features of the B×B block (B = block_px) whose top-left corner
    is input px (stride·i, stride·j), computed with the input's real neighbourhood (zero padding only at
    the input's own edge). With stride == B this is ``model.features(x)``. Pools up to `stride` run as in
    the encoder; the later ones run with stride 1 and the convs after them are dilated by
    (grid spacing / stride), which keeps every phase of the pooling grid.

    `x` is float in [0, 1], or uint8 tiles (converted as `to_input` does). Every op runs in channels_last
    memory (torch's CPU max-pool is ~9× faster there than on NCHW maps of a few channels), activations in
    place: the maps are large, and each fresh copy costs its page faults. (Running the first block over row
    strips, to keep its maps in cache, was measured 1.5–3× slower: many small convolutions cost more.)
    """
    return dense_trunk_and_tap(model, x, stride, 0)[0]


def dense_trunk_and_tap(
    model: Encoder, x: torch.Tensor, stride: int, blocks: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """`dense_trunk`'s map, and the map after the trunk's first `blocks` conv blocks (None if 0) with the px
    between its samples: what a centre read from the trunk (model.centre_source: trunk) averages."""
    _check(model, stride)
    x = x.contiguous(memory_format=torch.channels_last)
    x = to_input(x) if x.dtype == torch.uint8 else x
    spacing, step = 1, 1  # px between the features' grid positions, and between their samples
    tap, tap_step, done = None, 0, 0
    for m, weight, bias in _plan(model):
        x, spacing, step = _layer(m, weight, bias, x, spacing, step, stride)
        if isinstance(m, nn.LeakyReLU) and done < blocks:
            done += 1  # each conv block ends with its activation
            if done == blocks:
                tap, tap_step = x, step  # later layers write new maps (only activations run in place, on them)
    return x, tap, tap_step


def windows_at(fmap: torch.Tensor, rows: np.ndarray, cols: np.ndarray, taps: int, step: int) -> torch.Tensor:
    """(N, C, taps, taps) windows of a (C, H, W) trunk map starting at (rows, cols), taps `step` positions apart."""
    offsets = torch.arange(taps) * step
    r = torch.as_tensor(rows, dtype=torch.int64)[:, None] + offsets
    c = torch.as_tensor(cols, dtype=torch.int64)[:, None] + offsets
    hwc = fmap.permute(1, 2, 0)  # a view: channels_last maps gather whole C-vectors
    return hwc[r[:, :, None], c[:, None, :]].permute(0, 3, 1, 2)


def _gather(flat: torch.Tensor, height: int, rows: np.ndarray, cols: np.ndarray, taps: int, step: int) -> torch.Tensor:
    """(N, taps·taps·C) windows in (row, col, channel) order from the (H·W, C) positions of a channels_last map:
    one `index_select` of whole C-vectors (measured faster than `windows_at`'s advanced indexing)."""
    width = flat.shape[0] // height
    off = torch.arange(taps, dtype=torch.int64) * step
    r = torch.as_tensor(rows, dtype=torch.int64)[:, None, None] + off[:, None]
    c = torch.as_tensor(cols, dtype=torch.int64)[:, None, None] + off[None, :]
    if len(rows) and (int(r.min()) < 0 or int(c.min()) < 0 or int(r.max()) >= height or int(c.max()) >= width):
        raise IndexError(f"a head window leaves the {height}×{width} trunk map")
    return flat.index_select(0, (r * width + c).reshape(-1)).reshape(len(rows), -1)


def _head(
    model: Encoder, win: torch.Tensor, channels: int, taps: int, centre: torch.Tensor | None = None
) -> torch.Tensor:
    """The encoder's head on (N, taps·taps·C) windows in (row, col, channel) order, followed by the centre
    branch's (N, C') features when the encoder has one: its first Linear's trunk columns are permuted to that
    order instead of each window to the flatten's (C, row, col), saving a copy."""
    if (centre is None) != (not model.cfg.centre_px):
        raise ValueError("the centre branch's features are needed exactly when the encoder has a centre branch")
    mods = list(model.head)
    if len(mods) < 2 or not isinstance(mods[0], nn.Flatten) or not isinstance(mods[1], nn.Linear):
        flat = win.reshape(len(win), taps, taps, channels).permute(0, 3, 1, 2).flatten(1)
        return model.head(flat if centre is None else torch.cat([flat, centre], 1))
    lin, width = mods[1], channels * taps * taps
    weight = lin.weight[:, :width].reshape(lin.out_features, channels, taps, taps).permute(0, 2, 3, 1)
    x = F.linear(win, weight.reshape(lin.out_features, -1), lin.bias)
    if centre is not None:
        x = x.addmm_(centre, lin.weight[:, width:].t())
    for m in mods[2:]:
        x = m(x)
    return x


def centre_features(
    model: Encoder, array: np.ndarray, px: np.ndarray, py: np.ndarray, batch: int = 512
) -> torch.Tensor:
    """(N, C') the centre branch's mean-pooled features of the tiles whose top-left pixels are (px, py) in an
    (H, W, C) uint8 metatile: each tile's central centre_px² crop, cut and run through the branch exactly as the
    per-tile path runs it (zeros where a crop leaves the array).

    Why not a dense map like the trunk's: the branch's zero padding at the crop's edge reaches 12 of its 16
    pooled positions, so a map over the real neighbourhood would change most of what it averages; and the
    crops (32² px) barely overlap (an H3 res-11 cell is ~880 px), so sharing their convolutions would save
    little. Exact per-cell crops cost about what a dense map would, and agree with per-tile exactly.
    """
    assert model.centre is not None
    side = model.cfg.centre_px
    lo = (model.cfg.input_size - side) // 2
    xs, ys = (np.asarray(a, dtype=np.int64) + lo for a in (px, py))
    pooled = model.cfg.centre_source == "pooled"
    out = []
    for i in range(0, len(xs), batch):
        crops = _crops(array, xs[i : i + batch], ys[i : i + batch], side)
        if pooled:  # the centre's input dropout and AvgPool2d, on exact integer sums (measured faster than on floats)
            out.append(model.pooled_centre_layers(_block_means(crops, model.cfg.centre_block_px)).mean(dim=(2, 3)))
        else:  # (n, C, side, side), a channels_last view
            out.append(model.centre(to_input(torch.from_numpy(crops).permute(0, 3, 1, 2))).mean(dim=(2, 3)))
    if not out:
        return torch.zeros((0, model.cfg.centre_channels[-1]))
    return torch.cat(out)


def _block_means(crops: np.ndarray, block: int) -> torch.Tensor:
    """(n, C, side/block, side/block) float32 means of each block × block px of (n, side, side, C) uint8 crops, in
    to_input's scale ([0, 1]): what a pooled centre's AvgPool2d computes on the float crops, up to summation order.
    The sums are exact integers, added one pixel column, then one pixel row, of every block at a time."""
    n, side, _, channels = crops.shape
    k = side // block
    dtype = np.uint16 if 255 * block * block < 2**16 else np.uint32
    cols = crops.reshape(n, side, k, block, channels)
    rows = cols[:, :, :, 0].astype(dtype)
    for j in range(1, block):
        np.add(rows, cols[:, :, :, j], out=rows)
    blocks = rows.reshape(n, k, block, k, channels)
    sums = blocks[:, :, 0].copy()
    for j in range(1, block):
        np.add(sums, blocks[:, :, j], out=sums)
    means = torch.from_numpy(sums.astype(np.float32)).div_(float(255 * block * block))
    return means.permute(0, 3, 1, 2)


def centre_from_tap(
    model: Encoder,
    tap: torch.Tensor,
    tap_step: int,
    gy: np.ndarray,
    gx: np.ndarray,
    position: Position,
) -> torch.Tensor:
    """(N, C') a trunk-read centre's features (model.centre_source: trunk) from the trunk's (C', H, W) map after its
    first blocks, sampled every `tap_step` px: the mean of the taps covering each tile's central centre_px², whose
    top-left lies at (gy, gx) map positions (fractional: snapped, or the four means around it bilinearly
    interpolated, as the trunk's windows are).

    Why from the map: the encoder's centre crop carries one position of margin each side (Encoder.centre_margin_px),
    so its inner positions are the map's own numbers; the centre then costs the dense path a gather, not a conv (a
    metatile window of ~2,400 cells: ~8 ms, ~2% of the window; box-averaging the map first was measured 2× slower).
    """
    side = model.centre_margin_px
    taps, d = model.cfg.centre_px // side, side // tap_step
    channels, height = tap.shape[0], tap.shape[1]
    flat = tap.permute(1, 2, 0).reshape(-1, channels)  # a view of a channels_last map
    n = len(gy)

    def mean_at(rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        return _gather(flat, height, rows, cols, taps, d).reshape(n, taps * taps, channels).mean(dim=1)

    if position == "snap":
        return mean_at(np.rint(gy).astype(np.int64), np.rint(gx).astype(np.int64))
    ay, ax = np.floor(gy).astype(np.int64), np.floor(gx).astype(np.int64)
    return _bilinear(mean_at, ay, ax, (gy - ay, gx - ax), tap.dtype)


def _bilinear(
    at: Callable[[np.ndarray, np.ndarray], torch.Tensor],
    rows: np.ndarray,
    cols: np.ndarray,
    frac: tuple[np.ndarray, np.ndarray],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The mix of `at`'s (N, …) rows at the four grid positions (rows + 0/1, cols + 0/1), weighted by the (row, col)
    fractions `frac` towards the next position (summed in place, in this order)."""
    fy, fx = (torch.as_tensor(f, dtype=dtype)[:, None] for f in frac)
    out = at(rows, cols).mul_((1 - fy) * (1 - fx))
    out.addcmul_(at(rows, cols + 1), (1 - fy) * fx)
    out.addcmul_(at(rows + 1, cols), fy * (1 - fx))
    return out.addcmul_(at(rows + 1, cols + 1), fy * fx)


def _overlap(shape: tuple[int, ...], y0: int, y1: int, x0: int, x1: int) -> tuple[slice, slice, slice, slice] | None:
    """Where the box [y0, y1) × [x0, x1) meets an array of `shape` (H, W, …): (rows, cols) in the array, then (rows,
    cols) in the box; None if they do not meet."""
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, shape[0]), max(x0, 0), min(x1, shape[1])
    if sy0 >= sy1 or sx0 >= sx1:
        return None
    return slice(sy0, sy1), slice(sx0, sx1), slice(sy0 - y0, sy1 - y0), slice(sx0 - x0, sx1 - x0)


def _crops(array: np.ndarray, xs: np.ndarray, ys: np.ndarray, side: int) -> np.ndarray:
    """(n, side, side, C) uint8 crops of an (H, W, C) array at top-left pixels (xs, ys), zeros beyond its edge: a
    slice copied per crop (measured 6.6× faster than one fancy-indexing gather of them all)."""
    out = np.zeros((len(xs), side, side, array.shape[2]), dtype=array.dtype)
    for i, (x, y) in enumerate(zip(xs.tolist(), ys.tolist(), strict=True)):
        if (box := _overlap(array.shape, y, y + side, x, x + side)) is not None:
            rows, cols, out_rows, out_cols = box
            out[i, out_rows, out_cols] = array[rows, cols]
    return out


def head_at(
    model: Encoder,
    fmap: torch.Tensor,
    rows: np.ndarray,
    cols: np.ndarray,
    stride: int,
    frac: tuple[np.ndarray, np.ndarray] | None = None,
    centre: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, D) embeddings of the tiles whose corners are at grid positions (rows, cols) of a `dense_trunk` map.

    `frac` = (row, col) fractions in [0, 1): the tile corner lies that far towards the next grid
    position, and the four windows around it are bilinearly interpolated before the head. `centre`: the
    tiles' `centre_features`, for an encoder with a centre branch (cut at the exact pixel, not interpolated).
    """
    _check(model, stride)
    taps, step = model.cfg.feature_size, block_px(model) // stride
    channels, height = fmap.shape[0], fmap.shape[1]
    flat = fmap.permute(1, 2, 0).reshape(-1, channels)  # a view of a channels_last map
    if frac is None:
        return _head(model, _gather(flat, height, rows, cols, taps, step), channels, taps, centre)
    win = _bilinear(lambda r, c: _gather(flat, height, r, c, taps, step), rows, cols, frac, fmap.dtype)
    return _head(model, win, channels, taps, centre)


def cut_pixels(xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-tile cut's top-left pixels (int64) of tiles with corners (xs, ys) from `tile_corners`: the pixel under
    pixel (0, 0)'s centre."""
    return np.floor(np.asarray(xs) + 0.5).astype(np.int64), np.floor(np.asarray(ys) + 0.5).astype(np.int64)


def tile_corners(index: MetatileIndex, lats: np.ndarray, lons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(metatile key, corner col, corner row) of each location's tile (angle 0, no shift), in metatile px.

    The corner is pixel (0, 0)'s centre minus half a pixel (continuous; the per-tile cut starts at the
    pixel under that centre, ⌊corner + ½⌋).
    """
    lats, lons = check_locations(index.region, lats, lons, index.bbox)
    keys = np.asarray(index.keys_for(lats, lons))
    unique, inverse = np.unique(keys, return_inverse=True)
    metas = []
    for key in unique.tolist():
        if key not in index.entries:
            raise RenderError(
                f"metatile {key} of region {index.region!r} is not rendered: call ensure_metatiles() with these "
                "locations first"
            )
        metas.append(index.entries[key])
    minx, maxy, upx = (np.array([getattr(m, f) for m in metas])[inverse] for f in ("minx", "maxy", "units_per_px"))
    n = len(lats)
    aff = tile_affines(lats, lons, np.zeros(n), np.zeros((n, 2)), index.grid.size, minx, maxy, upx, index.grid.mpp)
    return keys, aff[:, 0] - 0.5, aff[:, 3] - 0.5


def _window_input(array: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> torch.Tensor:
    """The encoder's input over array[y0:y1, x0:x1] of an (H, W, C) uint8 metatile, zeros where the range leaves
    it: (1, C, h, w) float32 in [0, 1] in channels_last memory, written in one pass (cast and ÷255 as
    `to_input` computes it) instead of a uint8 crop, a float copy and a division over it."""
    out = np.empty((y1 - y0, x1 - x0, array.shape[2]), dtype=np.float32)
    box = _overlap(array.shape, y0, y1, x0, x1)
    if box is None:
        out[:] = 0
        return torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)
    rows, cols, ry, rx = box
    np.divide(array[rows, cols], np.float32(255), out=out[ry, rx], casting="unsafe")
    out[: ry.start], out[ry.stop :] = 0, 0  # the halo beyond the metatile's edge
    out[ry, : rx.start], out[ry, rx.stop :] = 0, 0
    return torch.from_numpy(out).permute(2, 0, 1).unsqueeze(0)


def _box_counts(array: np.ndarray, ys: np.ndarray, xs: np.ndarray, size: int) -> np.ndarray:
    """(N, C) non-zero pixels per channel of the size×size boxes at (ys, xs) of an (H, W, C) uint8 array (pixels
    outside it count as zero).

    Column prefix sums over the rows and columns the boxes span, one row added at a time (numpy's and torch's
    cumsum over a leading axis walk it element by element, ~4× slower here) with the non-zero test fused into
    the addition, then per box the difference of its bottom and top prefix rows over its `size` columns (in
    uint16: a column of a box holds ≤ size pixels), summed.
    """
    n, channels = len(ys), array.shape[2]
    if not n:
        return np.zeros((0, channels), np.int32)
    r0, r1 = max(int(ys.min()), 0), min(int(ys.max()) + size, array.shape[0])
    c0, c1 = max(int(xs.min()), 0), min(int(xs.max()) + size, array.shape[1])
    if r0 >= r1 or c0 >= c1:
        return np.zeros((n, channels), np.int32)
    prefix = np.empty((r1 - r0 + 1, c1 - c0, channels), dtype=np.uint16)  # a column holds < 2^16 pixels
    prefix[0] = 0
    for i in range(r1 - r0):
        np.add(prefix[i], array[r0 + i, c0:c1] != 0, out=prefix[i + 1])
    top = np.clip(ys - r0, 0, r1 - r0)[:, None]
    bottom = np.clip(ys + size - r0, 0, r1 - r0)[:, None]
    cols = xs[:, None] - c0 + np.arange(size)
    inside = (cols >= 0) & (cols < c1 - c0)
    if not inside.all():
        cols = np.clip(cols, 0, c1 - c0 - 1)
    diff = prefix[bottom, cols] - prefix[top, cols]
    if not inside.all():
        diff[~inside] = 0
    return diff.sum(axis=1, dtype=np.int32)


def _window_ids(positions: np.ndarray, per_window: int) -> np.ndarray:
    """Which of the equal windows spanning the positions' range each position falls in: as few as hold at
    most per_window + 1 positions each (a metatile core of window_px px spans window_px / stride + 1)."""
    lo, hi = int(positions.min()), int(positions.max()) + 1
    count = max(1, -(-(hi - lo - 1) // per_window))
    return (positions - lo) * count // (hi - lo)


def encode_metatile(
    model: Encoder, array: np.ndarray, xs: np.ndarray, ys: np.ndarray, settings: DenseSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D), histograms (n, 12)) float32 of the tiles with corners (xs, ys) (metatile px) of one
    (H, W, 12) uint8 metatile, window by window (see the module doc)."""
    s, block, size = settings.stride, block_px(model), model.cfg.input_size
    _check(model, s)
    if settings.window_px % block:
        raise ValueError(f"dense window_px {settings.window_px} must be a multiple of {block}")
    per_window = settings.window_px // s  # grid positions per window side
    gx, gy = np.asarray(xs, dtype=np.float64) / s, np.asarray(ys, dtype=np.float64) / s
    if settings.position == "snap":
        ax, ay = np.rint(gx).astype(np.int64), np.rint(gy).astype(np.int64)
        frac = None
    else:
        ax, ay = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
        frac = (gy - ay, gx - ax)
    px, py = cut_pixels(xs, ys)
    from_trunk = model.centre_blocks if model.centre_margin_px else 0  # a margin: the centre is read from the trunk
    n = len(gx)
    emb = np.empty((n, model.cfg.embedding_dim), dtype=np.float32)
    counts = np.empty((n, array.shape[2]), dtype=np.int32)
    wid = _window_ids(ay, per_window) * n + _window_ids(ax, per_window)
    for w in np.unique(wid).tolist():
        sel = np.flatnonzero(wid == w)
        reach = 1 if frac is not None else 0  # bilinear reads the next grid position too
        # the window: its cells' corners (fitted), one block of halo each side; starts on the grid (pools align)
        gy0, gx0 = int(ay[sel].min()), int(ax[sel].min())
        y0, x0 = gy0 * s - block, gx0 * s - block
        y1 = (int(ay[sel].max()) + reach) * s + size + block
        x1 = (int(ax[sel].max()) + reach) * s + size + block
        counts[sel] = _box_counts(array, py[sel], px[sel], size)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.bf16):
            fmap, tap, tap_step = dense_trunk_and_tap(model, _window_input(array, y0, y1, x0, x1), s, from_trunk)
            fmap, tap = fmap[0].float(), None if tap is None else tap.float()  # no-ops in float32
            rows, cols = ay[sel] - gy0 + block // s, ax[sel] - gx0 + block // s
            sub = None if frac is None else (frac[0][sel], frac[1][sel])
            centre = None
            if tap is not None:
                lo = (size - model.cfg.centre_px) // 2  # the centre's top-left in the tile
                gyc, gxc = ((np.asarray(v, np.float64)[sel] + lo - o) / tap_step for v, o in ((ys, y0), (xs, x0)))
                centre = centre_from_tap(model, tap[0], tap_step, gyc, gxc, settings.position)
            elif model.centre is not None:
                centre = centre_features(model, array, px[sel], py[sel]).float()
        with torch.inference_mode():  # interpolation and head in float32 (~1% of the multiply-adds)
            emb[sel] = head_at(model, fmap, rows, cols, s, sub, centre).float().numpy()
    hist = (counts.astype(np.float32) / np.float32(size * size)).astype(np.float32)
    return emb, hist


def encode_dense_chunk(
    index: MetatileIndex, model: Encoder, key: str, xs: np.ndarray, ys: np.ndarray, settings: DenseSettings
) -> tuple[np.ndarray, np.ndarray]:
    """`encode_metatile` on one metatile of the index (a task: `index` travels without its memory maps). The
    metatile is read once, so it is not kept in the index's LRU (taken from it if it is there)."""
    return encode_metatile(model, index.array(key, keep=False), xs, ys, settings)


def encode_dense(
    model: Encoder,
    index: MetatileIndex,
    lats: np.ndarray,
    lons: np.ndarray,
    settings: DenseSettings,
    progress: bool = True,
    *,
    cfg: OrchestrateConfig,
    kind: RunnerKind | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (n, D), histograms (n, 12)) float32 of the locations, dense: one task per metatile on the
    configured runner, assembled in the locations' order."""
    kind = kind or runner_kind(cfg)
    model = model.eval()
    keys, xs, ys = tile_corners(index, np.asarray(lats), np.asarray(lons))
    n = len(keys)
    emb = np.empty((n, model.cfg.embedding_dim), dtype=np.float32)
    hist = np.empty((n, N_CHANNELS), dtype=np.float32)
    groups = [np.flatnonzero(keys == k) for k in np.unique(keys).tolist()]
    bar = tqdm(total=n, desc=f"embed dense ({kind})", unit="cell", disable=not progress)

    def store(i: int, result: tuple[np.ndarray, np.ndarray]) -> None:
        emb[groups[i]], hist[groups[i]] = result
        bar.update(len(groups[i]))

    with bar:
        map_tasks(
            encode_dense_chunk,
            [
                {"index": index, "model": model, "key": str(keys[g[0]]), "xs": xs[g], "ys": ys[g], "settings": settings}
                for g in groups
            ],
            store,
            flow_name="loc2vec-embed",
            run_name=f"{index.region}-{n}-dense",
            task_name="encode-metatile",
            task_run_name=index.region + "-{key}",
            cfg=cfg,
            kind=kind,
        )
    if not np.isfinite(emb).all():
        raise ValueError("the model produced non-finite embeddings")
    return emb, hist
