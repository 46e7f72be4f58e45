"""The Loc2Vec encoder: a 12-channel 128×128 map tile → a 16-D location embedding.

Architecture (params.yaml `model:`, core.config.ModelConfig), after the Loc2Vec article:

    Dropout2d(0.05) on the input    – drops whole semantic channels, so the embedding cannot
                                      lean on any single layer (e.g. only on roads)
    5 × [Conv3×3 → MaxPool2 → BN → LeakyReLU]   widths 16, 32, 64, 96, 128   (128² → 4²)
    2 × [Conv1×1 → LeakyReLU]                   widths 64, 32  ("network in network":
                                      learned cross-channel pooling shrinks the flatten)
    Flatten (32·4·4 = 512) → Linear 192 → LeakyReLU → Dropout(0.1)
    Linear 16                       – the embedding, no activation (distances live in R^16)

Exact parameter count of this network: 303,248 (the article's has 305,040); 340,528 with the centre branch, 315,536
with the centre read from the trunk, 318,512 with the pooled centre.

Centre branch (`model.centre_px` > 0; params.yaml's default, 32, since the champion gate chose it; ModelConfig's
own default is 0, the article's encoder, so that stored models without the key load as they were): the context
trunk above still reads the whole tile, positives shifted up to augment.max_shift_m (the article's invariance),
while a small second trunk (`centre_channels` blocks of the same kind, mean-pooled) reads the central centre_px ×
centre_px px, whose training positive is cut at the same rotation but shifted only augment.centre_max_shift_m
(GPS-noise scale): so what lies under the point is kept beside the surroundings (issue 17, "two scales,
centre-aware"). The head reads both, flatten(trunk) ++ centre features. In training a tile carries the two views
as 2 × in_channels channels (context view, then centre view: training/sources.py); any 12-channel tile is both
views.

Centre read from the trunk (`model.centre_source: trunk`): no convs of its own; the centre's features are the mean
of the trunk's own map after its first len(centre_channels) blocks over the central centre_px px. A separate centre
view (training) runs those blocks over its crop with one position of margin each side (`centre_margin_px`, 8 px), so
the crop's zero padding never reaches what is averaged: its features are exactly what the trunk computes over a whole
tile, or the dense path over a metatile, where they cost a gather instead of a second trunk (embedding/dense.py).

Pooled centre (`model.centre_source: pooled`): the branch's 3×3 convs replaced by one average over each
centre_block_px² block of the central crop (8 px: a 4×4 grid of the coverages under the point), then 1×1 convs of
centre_channels' widths per block (a small MLP shared by the blocks), mean-pooled: ~44 k multiply-adds per tile
against the branch's ~4.1 M, so the dense path pays a cell's centre a few µs instead of about what its trunk window
costs (embedding/dense.py). Trained like the branch (its own views, shifted at GPS-noise scale).

Convs followed by BatchNorm carry no bias (BN's shift replaces it). `forward` has no
data-dependent Python control flow, so it is `torch.compile`-able, and every op
accepts channels_last inputs and bf16 autocast.
"""

from __future__ import annotations

import torch
from torch import nn

from loc2vec.core.config import ModelConfig


def conv_blocks(in_channels: int, widths: tuple[int, ...], act: nn.Module) -> list[nn.Module]:
    """[3×3 conv → 2×2 max-pool → BN → act] per width: the trunk's blocks, and the centre branch's.

    Pool right after the conv: BN and LeakyReLU then run on a quarter of the pixels (30% faster training steps on
    CPU, same parameters).
    """
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), act]
        c = w
    return layers


def pointwise_blocks(in_channels: int, widths: tuple[int, ...], act: nn.Module) -> list[nn.Module]:
    """[1×1 conv → BN → act] per width: a pooled centre's per-block layers (each block's averaged coverage →
    features), a small MLP shared by the blocks, next to nothing beside the trunk's 3×3 convs."""
    layers: list[nn.Module] = []
    c = in_channels
    for w in widths:
        layers += [nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), act]
        c = w
    return layers


class Encoder(nn.Module):
    """Tile (B, C, H, W) float in [0, 1] → embedding (B, embedding_dim)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else ModelConfig()
        act = nn.LeakyReLU(cfg.leaky_slope)

        layers = [nn.Dropout2d(cfg.input_dropout), *conv_blocks(cfg.in_channels, cfg.conv_channels, act)]
        c = cfg.conv_channels[-1]
        for w in cfg.nin_channels:
            layers += [nn.Conv2d(c, w, 1), act]
            c = w
        self.features = nn.Sequential(*layers)

        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * cfg.feature_size**2 + self._centre_width(), cfg.dense_units),
            act,
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.dense_units, cfg.embedding_dim),
        )
        # Built after the head, so that an encoder without it draws exactly the weights it always drew.
        self.centre: nn.Sequential | None = None
        if cfg.centre_px and cfg.centre_source == "branch":
            blocks = conv_blocks(cfg.in_channels, cfg.centre_channels, act)
            self.centre = nn.Sequential(nn.Dropout2d(cfg.input_dropout), *blocks)
        elif cfg.centre_px and cfg.centre_source == "pooled":
            blocks = pointwise_blocks(cfg.in_channels, cfg.centre_channels, act)
            pool = nn.AvgPool2d(cfg.centre_block_px)
            self.centre = nn.Sequential(nn.Dropout2d(cfg.input_dropout), pool, *blocks)
        self._init_weights()

    def _centre_width(self) -> int:
        return self.cfg.centre_channels[-1] if self.cfg.centre_px else 0

    def _init_weights(self) -> None:
        # Kaiming init matched to the leaky slope keeps activations' scale through 7 conv layers.
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, a=self.cfg.leaky_slope, nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context view, centre crop) of a batch: tiles of in_channels are both views; tiles of 2 × in_channels
        (training with a centre branch) carry the context view, then the centre view. With the centre read from
        the trunk, the crop has a margin of one position of its last block each side (`centre_margin_px`)."""
        n, side = self.cfg.in_channels, self.cfg.centre_px + 2 * self.centre_margin_px
        if x.shape[1] not in (n, 2 * n):
            raise ValueError(f"expected {n} (or, with a centre branch, {2 * n}) channels, got {x.shape[1]}")
        context, centre = (x[:, :n], x[:, n:]) if x.shape[1] == 2 * n else (x, x)
        lo = (x.shape[-1] - side) // 2
        return context, centre[..., lo : lo + side, lo : lo + side]

    @property
    def pooled_centre_layers(self) -> nn.Module:
        """A pooled centre's layers after its input dropout and block average (built in __init__ as [Dropout2d,
        AvgPool2d, 1×1 layers…]): what the dense path runs on block means it sums itself (embedding/dense.py)."""
        if self.centre is None or self.cfg.centre_source != "pooled":
            raise ValueError("the encoder has no pooled centre")
        return self.centre[2:]

    @property
    def centre_blocks(self) -> int:
        """How many conv blocks the centre's features come out of."""
        return len(self.cfg.centre_channels) if self.cfg.centre_px else 0

    @property
    def centre_margin_px(self) -> int:
        """With the centre read from the trunk, the px its crop carries beyond centre_px on each side: one position
        of the last block it reads (2**centre_blocks px). The zero padding at a crop's edge changes exactly one
        ring of positions per block, so the crop's inner positions are what the trunk computes over the whole tile
        (and the dense path over a metatile): the three paths agree (tests/test_model.py, tests/test_dense.py)."""
        return 2**self.centre_blocks if self.cfg.centre_px and self.cfg.centre_source == "trunk" else 0

    def _trunk_and_centre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The trunk's map of the context view and the centre's mean-pooled features."""
        context, centre = self.views(x)
        if self.centre is not None:
            return self.features(context), self.centre(centre).mean(dim=(2, 3))
        stem_len = 1 + 4 * self.centre_blocks  # the input's Dropout2d, then [conv, pool, BN, act] per block
        stem, rest = self.features[:stem_len], self.features[stem_len:]
        mid = stem(context)
        if x.shape[1] == self.cfg.in_channels:  # one view: its centre is the middle of the trunk's own map
            lo = (self.cfg.input_size - self.cfg.centre_px) // 2 // self.centre_margin_px
            width = self.cfg.centre_px // self.centre_margin_px
            inner = mid[..., lo : lo + width, lo : lo + width]
        else:
            inner = stem(centre)[..., 1:-1, 1:-1]
        return rest(mid), inner.mean(dim=(2, 3))

    def _trunk_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trunk's map and, with a centre, the centre's mean-pooled features: what the head and the pooled
        representation both read."""
        if not self.cfg.centre_px:
            return self.features(x), None
        return self._trunk_and_centre(x)

    def _embed(self, trunk: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        return self.head(trunk if centre is None else torch.cat([trunk.flatten(1), centre], 1))

    @staticmethod
    def _pooled(trunk: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        pooled = trunk.mean(dim=(2, 3))
        return pooled if centre is None else torch.cat([pooled, centre], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embed(*self._trunk_outputs(x))

    def forward_with_bf16_convs(self, x: torch.Tensor) -> torch.Tensor:
        """forward(x) with the convolutions under bf16 autocast on the CPU and the head in float32, as the dense path
        computes it (embed.cpu_bf16, embedding/): the convolutions carry the cost, and a float32 head keeps the
        embedding from being rounded to bf16's 8-bit mantissa."""
        with torch.autocast("cpu", dtype=torch.bfloat16):
            trunk, centre = self._trunk_outputs(x)
        return self._embed(trunk.float(), None if centre is None else centre.float())

    def embedding_and_representation(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(forward(x), representation(x)) from one pass of the trunk: the same numbers as the two calls."""
        trunk, centre = self._trunk_outputs(x)
        return self._embed(trunk, centre), self._pooled(trunk, centre)

    def representation(self, x: torch.Tensor) -> torch.Tensor:
        """(B, nin_channels[-1]) the convolutional trunk's output averaged over its 4×4 positions: what the dense
        head reads, pooled, before the projection to the embedding (``loc2vec_wide`` in the evaluation suite).

        SimCLR reports the layer before the projection head to be better under a linear probe than the loss's own
        output. Of eight layers tried on Liechtenstein folds (README, "Wider than 16-D"), this 32-D one added the
        most to the best cheap baseline. With a centre branch, its mean-pooled features follow.
        """
        return self._pooled(*self._trunk_outputs(x))


def to_input(tiles_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 tiles (B, C, H, W) with coverage 0..255 → float32 in [0, 1], the encoder's input.

    Tiles are stored as uint8 (4× smaller); dataloaders convert per batch, keeping the memory format.
    """
    if tiles_uint8.dtype != torch.uint8:
        raise TypeError(f"to_input expects uint8 tiles, got {tiles_uint8.dtype}")
    return tiles_uint8.to(torch.float32).div_(255.0)


def channel_coverage(tiles_uint8: torch.Tensor) -> torch.Tensor:
    """(B, C) fraction of non-zero pixels per channel: the evaluation's ``histogram`` featureset."""
    return (tiles_uint8 != 0).float().mean(dim=(2, 3))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
