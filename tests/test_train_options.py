"""Training options of issue 17: `preset: article`, CPU bf16 autocast and channels_last, as params.yaml reads them."""

from __future__ import annotations

import pytest

from loc2vec.core.config import PRESETS, ModelConfig, parse_params, read_yaml
from loc2vec.core.errors import ConfigError
from loc2vec.training.model import Encoder, count_parameters

from .conftest import REPO


def _params(**overrides: dict):
    raw = read_yaml(REPO / "params.yaml")
    for section, values in overrides.items():
        raw[section] = {**(raw.get(section) or {}), **values} if isinstance(values, dict) else values
    return parse_params(raw, REPO)


def test_article_preset_resolves_to_the_articles_setup() -> None:
    # Later defaults may move on: a params.yaml that changes every one of these keys still gives the article's.
    p = _params(
        preset="article",
        model={"embedding_dim": 64, "conv_channels": [8, 32, 64, 96, 128], "dense_units": 256},
        loss={"name": "infonce"},
        augment={"max_shift_m": 15.0, "channel_drop_p": 0.0},
        shards={"k_positives": 4},
        triplets={"locations_per_batch": 64, "pairs_per_location": 2},
        train={"cpu_bf16": True, "max_steps": 1234},
        compute={"cpu_isa": "native"},
    )
    assert p.preset == "article"
    # The article (seed 000): 16-D embedding, 5 conv blocks 16→128, SoftPN, ±80 m shifts, channel drop 0.2.
    assert p.model.embedding_dim == 16
    assert p.model.conv_channels == (16, 32, 64, 96, 128) and p.model.nin_channels == (64, 32)
    assert p.model.dense_units == 192
    assert count_parameters(Encoder(p.model)) == 303_248
    assert p.loss.name == "softpn"
    assert (p.augment.max_shift_m, p.augment.channel_drop_p) == (80.0, 0.2)
    assert (p.triplets.locations_per_batch, p.triplets.pairs_per_location) == (20, 5)
    assert p.train.cpu_bf16 is False
    assert p.shards.k_positives == 20
    # What the preset does not name stays the file's: the step budget is the run's.
    assert p.train.max_steps == 1234


def test_article_preset_is_written_as_literals() -> None:
    # The preset holds values, not references to the defaults: it equals today's defaults by value only,
    # so the v1 champion's weights (trained with them) load into the article's encoder.
    assert ModelConfig(**PRESETS["article"]["model"]) == ModelConfig()
    article = Encoder(ModelConfig(**PRESETS["article"]["model"])).state_dict()
    assert {k: v.shape for k, v in article.items()} == {k: v.shape for k, v in Encoder().state_dict().items()}


def test_no_preset_and_unknown_preset() -> None:
    assert _params().preset is None
    with pytest.raises(ConfigError, match="preset"):
        _params(preset="tile2vec")


def test_cpu_bf16_needs_the_cpus_own_kernels() -> None:
    with pytest.raises(ConfigError, match=r"train.cpu_bf16 needs compute.cpu_isa: native"):
        _params(train={"cpu_bf16": True})
    p = _params(train={"cpu_bf16": True}, compute={"cpu_isa": "native"})
    assert p.train.cpu_bf16 and p.train.channels_last


def test_centre_branch_needs_a_shift_the_metatiles_cover() -> None:
    with pytest.raises(ConfigError, match=r"centre_max_shift_m must not exceed"):
        _params(model={"centre_px": 32}, augment={"centre_max_shift_m": 90.0})
    for method in ("dense", "per_tile"):  # both embedding paths run the centre branch
        p = _params(model={"centre_px": 32}, embed={"method": method})
        assert p.model.centre_px == 32 and p.augment.centre_max_shift_m == 15.0
    assert _params(preset="article", model={"centre_px": 32}).model.centre_px == 0  # the article has no centre branch
