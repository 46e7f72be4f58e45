"""Training options of issue 17: `preset: article`, CPU bf16 autocast and channels_last, as params.yaml reads them."""

from __future__ import annotations

import os

import pytest

from loc2vec.core.config import PRESETS, ComputeConfig, ModelConfig, parse_params, read_yaml
from loc2vec.core.errors import ConfigError
from loc2vec.core.numerics import ISA_ENV, PIN_MARKER, pin_cpu_numerics, resolve_cpu_bf16
from loc2vec.embedding.dense import DenseSettings
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
    with pytest.raises(ConfigError, match=r"embed.cpu_bf16 needs compute.cpu_isa: native"):
        _params(train={"cpu_bf16": False}, embed={"cpu_bf16": True})


def test_embed_auto_bf16_resolves_for_the_embed_section_alone() -> None:
    """embed.cpu_bf16: auto as train's (resolved by `loc2vec embed` and `bench embed`); train's setting untouched;
    unresolved in a library call, it is float32 under our AVX2 pin (the tests' own)."""
    p = _params(train={"cpu_bf16": "auto"}, embed={"cpu_bf16": "auto"})
    own_pin = {**ISA_ENV["avx2"], PIN_MARKER: "avx2"}
    amx = frozenset({"avx2", "amx_bf16", "amx_tile"})
    on = resolve_cpu_bf16(p, section="embed", env=own_pin, flags=amx, lift_own_pin=True)
    assert on.embed.cpu_bf16 is True and on.compute.cpu_isa == "native" and on.train == p.train
    off = resolve_cpu_bf16(p, section="embed", env=own_pin, flags=frozenset({"avx2"}), lift_own_pin=True)
    assert off.embed.cpu_bf16 is False and off.compute.cpu_isa == "avx2" and off.train == p.train
    assert DenseSettings.from_config(on.embed).bf16 and not DenseSettings.from_config(off.embed).bf16
    assert not DenseSettings.from_config(p.embed).bf16  # auto under the tests' AVX2 pin


def test_auto_bf16_resolves_by_the_cpus_flags_and_the_caps_it_finds() -> None:
    """train.cpu_bf16: auto is valid with the pinned ISA; `loc2vec train` resolves it before pinning: bf16 with the CPU's
    own kernels where the CPU reports bf16 and no cap but loc2vec's own keeps oneDNN below them, else float32 pinned."""
    p = _params(train={"cpu_bf16": "auto"})
    assert p.train.cpu_bf16 == "auto" and p.compute.cpu_isa == "avx2"
    amx, avx2_only = frozenset({"avx2", "amx_bf16", "amx_tile"}), frozenset({"avx2", "fma"})
    own_pin = {**ISA_ENV["avx2"], PIN_MARKER: "avx2"}  # what a parent command's pin leaves (a DVC stage's flow)
    foreign_cap = {"ONEDNN_MAX_CPU_ISA": "AVX2"}  # a machine's owner, or a test simulating an older CPU
    bf16 = resolve_cpu_bf16(p, env={}, flags=amx)
    assert bf16.train.cpu_bf16 is True and bf16.compute.cpu_isa == "native"
    assert bf16.compute.cpu_threads == p.compute.cpu_threads
    for env, flags, lift in ((own_pin, amx, False), (foreign_cap, amx, True), ({}, avx2_only, True)):
        fp32 = resolve_cpu_bf16(p, env=env, flags=flags, lift_own_pin=lift)
        assert fp32.train.cpu_bf16 is False and fp32.compute.cpu_isa == "avx2", (env, flags, lift)
    assert resolve_cpu_bf16(p, env=own_pin, flags=amx, lift_own_pin=True).train.cpu_bf16 is True
    assert resolve_cpu_bf16(p, env={"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"}, flags=amx).train.cpu_bf16 is True
    explicit = _params(train={"cpu_bf16": False})
    assert resolve_cpu_bf16(explicit, env={}, flags=amx) is explicit  # true and false stay what they say


def test_pinning_native_lifts_only_loc2vecs_own_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ISA_ENV["avx2"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(PIN_MARKER, raising=False)
    pin_cpu_numerics(ComputeConfig(cpu_isa="avx2", cpu_threads=0))
    assert os.environ[PIN_MARKER] == "avx2" and os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    pin_cpu_numerics(ComputeConfig(cpu_isa="native", cpu_threads=0))
    assert not {PIN_MARKER, *ISA_ENV["avx2"]} & set(os.environ)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # not ours: kept
    pin_cpu_numerics(ComputeConfig(cpu_isa="native", cpu_threads=0))
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX2"


def test_centre_branch_needs_a_shift_the_metatiles_cover() -> None:
    with pytest.raises(ConfigError, match=r"centre_max_shift_m must not exceed"):
        _params(model={"centre_px": 32}, augment={"centre_max_shift_m": 90.0})
    for method in ("dense", "per_tile"):  # both embedding paths run the centre branch
        p = _params(model={"centre_px": 32}, embed={"method": method})
        assert p.model.centre_px == 32 and p.augment.centre_max_shift_m == 15.0
    assert _params(preset="article", model={"centre_px": 32}).model.centre_px == 0  # the article has no centre branch
