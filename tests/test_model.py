"""The encoder: shapes, size, eval/channels_last equivalence, gradients, compile-ability."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from loc2vec.core.config import ModelConfig
from loc2vec.training.losses import softpn_loss
from loc2vec.training.model import Encoder, count_parameters, to_input


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder()


def test_default_config_mirrors_params(proj) -> None:
    # params.yaml's encoder is ModelConfig's (the article's) plus the centre branch the champion gate chose;
    # ModelConfig's own default stays without it, so stored models whose config lacks the key load as they were
    cfg = proj.params.model
    assert cfg == ModelConfig(centre_px=32)
    assert ModelConfig().centre_px == 0
    assert cfg.conv_channels == (16, 32, 64, 96, 128) and isinstance(cfg.conv_channels, tuple)
    assert cfg.feature_size == 4


def test_parameter_count(encoder: Encoder) -> None:
    n = count_parameters(encoder)
    assert 250_000 <= n <= 360_000
    assert n == 303_248  # the count stated in loc2vec/training/model.py's docstring


def test_output_shape(encoder: Encoder) -> None:
    encoder.train()
    out = encoder(torch.rand(3, 12, 128, 128))
    assert out.shape == (3, 16)
    assert out.dtype == torch.float32


def test_eval_batch_of_one_and_channels_last(encoder: Encoder) -> None:
    encoder.eval()
    x = torch.rand(4, 12, 128, 128)
    with torch.no_grad():
        one = encoder(x[:1])
        dense = encoder(x)
        cl = encoder(x.contiguous(memory_format=torch.channels_last))
        cl_model = Encoder(encoder.cfg).eval()
        cl_model.load_state_dict(encoder.state_dict())
        cl_model = cl_model.to(memory_format=torch.channels_last)
        cl_both = cl_model(x.contiguous(memory_format=torch.channels_last))
    assert one.shape == (1, 16)
    torch.testing.assert_close(one, dense[:1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cl, dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cl_both, dense, atol=1e-5, rtol=1e-4)


def test_eval_is_deterministic_and_train_uses_dropout(encoder: Encoder) -> None:
    x = torch.rand(2, 12, 128, 128)
    encoder.eval()
    with torch.no_grad():
        assert torch.equal(encoder(x), encoder(x))
    encoder.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.equal(encoder(x), encoder(x))


def test_every_parameter_gets_a_gradient_and_a_step_lowers_the_loss() -> None:
    torch.manual_seed(0)
    # 64² tiles keep this fast; every layer is the same, only the flatten is smaller.
    model = Encoder(ModelConfig(input_size=64, input_dropout=0.0, dropout=0.0))
    x = torch.rand(3, 4, 12, 64, 64)  # anchors, positives, negatives
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> float:
        emb = model(x.flatten(0, 1)).view(3, 4, -1)
        loss = softpn_loss(emb[0], emb[1], emb[2])
        opt.zero_grad()
        loss.backward()
        return loss.item()

    first = step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    opt.step()
    for _ in range(4):
        step()
        opt.step()
    assert step() < first


def test_to_input() -> None:
    tiles = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    x = to_input(tiles)
    assert x.dtype == torch.float32
    assert x.shape == (2, 3, 4, 4)
    assert x[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.2, 1.0])
    cl = torch.zeros(2, 12, 8, 8, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert to_input(cl).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="uint8"):
        to_input(torch.zeros(1, 12, 8, 8))


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(input_size=100)


def test_forward_traces_as_one_graph(encoder: Encoder) -> None:
    # fullgraph=True fails on any graph break (data-dependent Python control flow);
    # the eager backend checks Dynamo's capture without paying for Inductor's codegen.
    encoder.eval()
    compiled = torch.compile(encoder, fullgraph=True, backend="eager")
    x = torch.rand(2, 12, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), encoder(x))


@pytest.mark.parametrize("centre_px", [0, 32])
def test_forward_with_bf16_convs_is_forward_up_to_bf16_rounding(centre_px: int) -> None:
    """The convolutions in bf16, the head in float32: float32 out, not bf16-rounded, forward's direction."""
    torch.manual_seed(0)
    encoder = Encoder(ModelConfig(centre_px=centre_px)).eval()
    x = torch.rand(4, 12, 128, 128)
    with torch.no_grad():
        fp32, bf16 = encoder(x), encoder.forward_with_bf16_convs(x)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert not torch.equal(bf16, bf16.bfloat16().float())  # the head's float32 output, not bf16's 8-bit mantissa
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.999


def test_representation_is_forwards_pooled_trunk_output(encoder: Encoder) -> None:
    """`representation` is exactly forward's own intermediate activation (what the dense head reads), pooled."""
    encoder.eval()
    seen: list[torch.Tensor] = []
    hook = encoder.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = torch.rand(3, 12, 128, 128)
    with torch.no_grad():
        out, wide = encoder(x), encoder.representation(x)
    hook.remove()
    assert wide.shape == (3, encoder.cfg.nin_channels[-1]) and out.shape == (3, 16) and len(seen) == 1
    assert torch.equal(wide, seen[0].mean(dim=(2, 3)))


@pytest.mark.parametrize("centre_px", [0, 32])
def test_embedding_and_representation_in_one_pass_equal_the_two_calls(centre_px: int) -> None:
    """The suite encodes loc2vec and loc2vec_wide from one trunk pass (evaluation/tilefeatures.encoder_tiles_both)."""
    torch.manual_seed(0)
    model = Encoder(ModelConfig(centre_px=centre_px)).eval()
    x = torch.rand(5, 12, 128, 128)
    with torch.no_grad():
        emb, rep = model.embedding_and_representation(x)
        assert torch.equal(emb, model(x)) and torch.equal(rep, model.representation(x))


def test_centre_branch_reads_the_centre_crop_of_its_view() -> None:
    torch.manual_seed(0)
    model = Encoder(ModelConfig(centre_px=32)).eval()
    assert "centre.1.weight" in model.state_dict() and not any("centre" in k for k in Encoder().state_dict())
    n_centre = 12 * 16 * 9 + 16 * 32 * 9 + 32 * 64 * 9 + 2 * (16 + 32 + 64)  # convs, BatchNorms
    assert count_parameters(model) == 303_248 + n_centre + 64 * 192  # and the head's wider first layer
    x = torch.rand(3, 12, 128, 128)
    with torch.no_grad():
        one = model(x)
        both = model(torch.cat([x, x], 1))  # a 12-channel tile is both views
        assert one.shape == (3, 16) and model.representation(x).shape == (3, 32 + 64)
        torch.testing.assert_close(one, both)
        centre_view = x.clone()
        centre_view[..., :48, :] = torch.rand(3, 12, 48, 128)  # outside the central 32 px: not read
        assert torch.equal(model(torch.cat([x, centre_view], 1)), both)
        centre_view[..., 60, 60] = 1 - centre_view[..., 60, 60]  # inside: read
        assert not torch.equal(model(torch.cat([x, centre_view], 1)), both)
    with pytest.raises(ValueError, match="channels"):
        model(torch.rand(1, 13, 128, 128))


def test_centre_branch_settings_are_checked_and_absent_keys_are_not_written() -> None:
    from pydantic import ValidationError

    assert "centre_px" not in ModelConfig().model_dump() and "centre_channels" not in ModelConfig().model_dump()
    assert ModelConfig(centre_px=32).model_dump()["centre_channels"] == (16, 32, 64)
    for bad in ({"centre_px": 36}, {"centre_px": 160}, {"centre_px": 33}, {"centre_px": 32, "centre_channels": ()}):
        with pytest.raises(ValidationError, match="centre"):
            ModelConfig(**bad)


def test_centre_read_from_the_trunk_is_the_trunks_own_map_and_its_crop() -> None:
    """centre_source: trunk has no convs of its own; a 12-channel tile's centre is the middle 4×4 of the trunk's map
    after three blocks, and a separate centre view's is the inner 4×4 of that map over its crop with one position
    (8 px) of margin each side: equal in eval mode, since the crop's zero padding reaches only the margin."""
    torch.manual_seed(0)
    model = Encoder(ModelConfig(centre_px=32, centre_source="trunk")).eval()
    assert not any("centre" in k for k in model.state_dict())
    assert count_parameters(model) == 303_248 + 64 * 192  # only the head's wider first layer
    assert model.centre_margin_px == 8
    x = torch.rand(3, 12, 128, 128)
    with torch.no_grad():
        stem = model.features[:13](x)  # the input's dropout, then three [conv, pool, BN, act] blocks
        assert model.representation(x)[:, 32:].equal(stem[..., 6:10, 6:10].mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), model(torch.cat([x, x], 1)), rtol=1e-6, atol=1e-6)
        centre_view = x.clone()
        centre_view[..., :40, :] = torch.rand(3, 12, 40, 128)  # outside the central 32 px and its margin: not read
        assert torch.equal(model(torch.cat([x, centre_view], 1)), model(torch.cat([x, x], 1)))
        centre_view[..., 41, 60] = 1 - centre_view[..., 41, 60]  # in the margin: read
        assert not torch.equal(model(torch.cat([x, centre_view], 1)), model(torch.cat([x, x], 1)))
    for bad in ({"centre_px": 32, "centre_channels": (16, 32, 48)}, {"centre_px": 120}):  # not the trunk's; no margin
        with pytest.raises(ValidationError, match="centre"):
            ModelConfig(centre_source="trunk", **bad)
    assert "centre_source" not in ModelConfig(centre_px=32).model_dump()  # stored branch models: unchanged keys
    assert ModelConfig(centre_px=32, centre_source="trunk").model_dump()["centre_source"] == "trunk"


def test_pooled_centre_is_its_blocks_means_through_pointwise_layers() -> None:
    """centre_source: pooled has no 3×3 convs: its features are the mean over the central crop's 8×8 px blocks of
    the 1×1 layers applied to each block's mean coverage; only the central 32 px are read."""
    torch.manual_seed(0)
    model = Encoder(ModelConfig(centre_px=32, centre_source="pooled")).eval()
    convs = [m for m in model.centre.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.kernel_size for m in convs] == [(1, 1)] * 3
    n_centre = 12 * 16 + 16 * 32 + 32 * 64 + 2 * (16 + 32 + 64)  # 1×1 convs, BatchNorms
    assert count_parameters(model) == 303_248 + n_centre + 64 * 192
    x = torch.rand(3, 12, 128, 128)
    with torch.no_grad():
        blocks = x[..., 48:80, 48:80].reshape(3, 12, 4, 8, 4, 8).mean(dim=(3, 5))
        expected = model.centre[2:](blocks).mean(dim=(2, 3))
        torch.testing.assert_close(model.representation(x)[:, 32:], expected)
        torch.testing.assert_close(model(x), model(torch.cat([x, x], 1)))
        centre_view = x.clone()
        centre_view[..., :48, :] = torch.rand(3, 12, 48, 128)  # outside the central 32 px: not read
        assert torch.equal(model(torch.cat([x, centre_view], 1)), model(torch.cat([x, x], 1)))
        centre_view[..., 79, 79] = 1 - centre_view[..., 79, 79]  # inside: read
        assert not torch.equal(model(torch.cat([x, centre_view], 1)), model(torch.cat([x, x], 1)))
    with pytest.raises(ValidationError, match="centre_block_px"):
        ModelConfig(centre_px=32, centre_source="pooled", centre_block_px=6)
    assert ModelConfig(centre_px=36, centre_source="pooled", centre_block_px=4).centre_px == 36  # no pool halvings
    assert ModelConfig(centre_px=32, centre_source="pooled").model_dump()["centre_block_px"] == 8
    assert "centre_block_px" not in ModelConfig(centre_px=32).model_dump()  # stored models: unchanged keys
