"""Triplet losses: hand-computed values, an independent SoftPN, gradcheck, and numerical stability."""

from __future__ import annotations

import math

import pytest
import torch

from loc2vec.core.config import LossConfig
from loc2vec.training.losses import (
    LOSSES,
    CoverageHead,
    build_loss,
    contrastive_loss,
    coverage_loss,
    distance,
    get_loss,
    mine_negatives,
    softmax_ratio_loss,
    softpn_loss,
    softpn_terms,
    triplet_accuracy,
    triplet_margin_loss,
)

F64 = torch.float64


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# Two triplets in 2-D:
#   row 0: a=(0,0) p=(1,0) n=(0,2):  Δ(a,p)=1, Δ(a,n)=2, Δ(p,n)=√5 → m=min(2,√5)=2
#   row 1: a=(0,0) p=(3,0) n=(4,0):  Δ(a,p)=3, Δ(a,n)=4, Δ(p,n)=1  → m=1 (the positive is closer to n)
A = t([[0, 0], [0, 0]])
P = t([[1, 0], [3, 0]])
N = t([[0, 2], [4, 0]])


def test_distance_values_and_zero_gradient() -> None:
    x = t([[0, 0], [1, 1]]).requires_grad_()
    y = t([[3, 4], [1, 1]])
    d = distance(x, y)
    assert d.tolist() == [5.0, 0.0]
    d.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[1].tolist() == [0.0, 0.0]


def test_softpn_hand_computed() -> None:
    # row 0: d+ = e^1/(e^1+e^2) = 1/(1+e) = 0.2689414;  d- = 1 − d+ = 0.7310586
    #        L0 = d+² + (d- − 1)² = 2·0.2689414² = 0.1446590
    # row 1: d+ = e^3/(e^3+e^1) = 1/(1+e^-2) = 0.8807971
    #        L1 = 2·0.8807971² = 1.5516067
    # mean = (0.1446590 + 1.5516067)/2 = 0.8481328
    l0 = 2 * (1 / (1 + math.e)) ** 2
    l1 = 2 * (1 / (1 + math.exp(-2))) ** 2
    assert l0 == pytest.approx(0.1446590, abs=1e-6)
    assert l1 == pytest.approx(1.5516067, abs=1e-6)
    loss = softpn_loss(A, P, N)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.8481328, abs=1e-6)


def test_softmax_ratio_hand_computed() -> None:
    # Uses Δ(a,n), not the min: row 0 as SoftPN (Δ(a,n)=2 → 0.1446590);
    # row 1: d+ = e^3/(e^3+e^4) = 1/(1+e) → also 0.1446590; mean 0.1446590.
    loss = softmax_ratio_loss(A, P, N)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.1446590, abs=1e-6)


def test_contrastive_hand_computed() -> None:
    # row 0: Δ(a,p)=|(3,4)|=5 → ½·25 = 12.5;  Δ(a,n)=1 < margin 2 → ½(2−1)² = 0.5;  L0 = 13.0
    # row 1: Δ(a,p)=0 → 0;  Δ(a,n)=|(3,4)|=5 ≥ 2 → 0;  L1 = 0
    # mean = 6.5
    a = t([[0, 0], [1, 1]])
    p = t([[3, 4], [1, 1]])
    n = t([[0, 1], [4, 5]])
    loss = contrastive_loss(a, p, n, margin=2.0)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(6.5, abs=1e-9)


# 1-D triplets for the mining rule (Δ = |x − y|), margin 0.2:
#   row 0: a=0,  p=1,   n=5     Δ(a,p)=1
#   row 1: a=10, p=1.1, n=0.5   Δ(a,p)=8.9
# Candidates for anchor 0: n0 (Δ=5), p1 (1.1), n1 (0.5)   [p0 is its positive]
# Candidates for anchor 1: n1 (Δ=9.5), p0 (9), n0 (5)
MA, MP, MN = t([[0], [10]]), t([[1], [1.1]]), t([[5], [0.5]])


def test_mining_choices() -> None:
    # hard: closest candidate → anchor 0: n1=0.5, anchor 1: n0=5
    assert mine_negatives(MA, MP, MN, "hard").flatten().tolist() == [0.5, 5.0]
    # semi-hard: closest candidate farther than Δ(a,p) → anchor 0: p1=1.1 (>1), anchor 1: p0=1 (Δ=9 > 8.9)
    assert mine_negatives(MA, MP, MN, "semi-hard").flatten().tolist() == [1.1, 1.0]
    assert mine_negatives(MA, MP, MN, "none").flatten().tolist() == [5.0, 0.5]


def test_triplet_margin_hand_computed() -> None:
    # hard:      row 0: 1 − 0.5 + 0.2 = 0.7;  row 1: 8.9 − 5 + 0.2 = 4.1;  mean 2.4
    # semi-hard: row 0: 1 − 1.1 + 0.2 = 0.1;  row 1: 8.9 − 9 + 0.2 = 0.1;  mean 0.1
    # none:      row 0: 1 − 5 + 0.2 < 0 → 0;  row 1: 8.9 − 9.5 + 0.2 < 0 → 0;  mean 0
    assert triplet_margin_loss(MA, MP, MN, margin=0.2, mining="hard").item() == pytest.approx(2.4, abs=1e-9)
    assert triplet_margin_loss(MA, MP, MN, margin=0.2, mining="semi-hard").item() == pytest.approx(0.1, abs=1e-9)
    assert triplet_margin_loss(MA, MP, MN, margin=0.2, mining="none").item() == 0.0


def test_semi_hard_falls_back_to_farthest() -> None:
    # row 0: a=0, p=10, n=1: Δ(a,p)=10; candidates n0=1, p1=2, n1=3 – none beyond 10 → farthest n1 (3):
    #        10 − 3 + 0.2 = 7.2
    # row 1: a=2.5, p=2, n=3: Δ(a,p)=0.5; candidates n1 (0.5), p0=10 (7.5), n0=1 (1.5);
    #        beyond 0.5 (strictly): 7.5, 1.5 → n0: 0.5 − 1.5 + 0.2 < 0 → 0
    # mean = 3.6
    a, p, n = t([[0], [2.5]]), t([[10], [2]]), t([[1], [3]])
    assert mine_negatives(a, p, n, "semi-hard").flatten().tolist() == [3.0, 1.0]
    assert triplet_margin_loss(a, p, n, margin=0.2).item() == pytest.approx(3.6, abs=1e-9)


def test_groups_exclude_same_location_positives() -> None:
    # Both rows from one location: p1 is no negative for anchor 0, p0 none for anchor 1.
    # semi-hard: anchor 0 → {n0=5, n1=0.5} beyond 1: n0 (5); anchor 1 → {n1=9.5, n0=5} beyond 8.9: n1 (9.5)
    groups = torch.tensor([7, 7])
    assert mine_negatives(MA, MP, MN, "semi-hard", groups=groups).flatten().tolist() == [5.0, 0.5]
    assert triplet_margin_loss(MA, MP, MN, mining="semi-hard", groups=groups).item() == 0.0


def test_softpn_matches_straightforward_formula() -> None:
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(64, 16, generator=g) for _ in range(3))

    def reference(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d_ap = torch.linalg.vector_norm(a - p, dim=1).double()
        m = torch.minimum(torch.linalg.vector_norm(a - n, dim=1), torch.linalg.vector_norm(p - n, dim=1)).double()
        d_pos = torch.exp(d_ap) / (torch.exp(d_ap) + torch.exp(m))
        d_neg = torch.exp(m) / (torch.exp(d_ap) + torch.exp(m))
        return (d_pos**2 + (d_neg - 1) ** 2).mean()

    got = softpn_loss(a, p, n)
    assert got.dim() == 0
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(reference(a, p, n).item(), abs=1e-5)


def test_terms_and_accuracy() -> None:
    terms = softpn_terms(A, P, N)
    assert terms["d_pos"].item() == pytest.approx((1 / (1 + math.e) + 1 / (1 + math.exp(-2))) / 2, abs=1e-9)
    assert (terms["d_pos"] + terms["d_neg"]).item() == pytest.approx(1.0)
    assert terms["dist_ap"].item() == pytest.approx(2.0)  # (1 + 3)/2
    assert terms["dist_neg"].item() == pytest.approx(1.5)  # (2 + 1)/2
    # row 0: 1 < min(2, √5) ✓; row 1: 3 < min(4, 1) ✗ → 0.5
    acc = triplet_accuracy(A, P, N)
    assert acc.dim() == 0 and acc.is_floating_point()
    assert acc.item() == 0.5


ALL_LOSSES = [
    pytest.param(softpn_loss, id="softpn"),
    pytest.param(softmax_ratio_loss, id="softmax_ratio"),
    pytest.param(lambda a, p, n: contrastive_loss(a, p, n, margin=3.0), id="contrastive"),
    pytest.param(lambda a, p, n: triplet_margin_loss(a, p, n, margin=0.2, mining="none"), id="triplet_none"),
]


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_gradcheck(fn) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = tuple(torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("mining", ["hard", "semi-hard"])
def test_gradcheck_mining(mining: str) -> None:
    # The hand-made 1-D batch: every mining gap and hinge is ≥ 0.1 from a tie, far beyond gradcheck's 1e-6.
    inputs = tuple(x.clone().requires_grad_() for x in (MA, MP, MN))
    assert torch.autograd.gradcheck(lambda a, p, n: triplet_margin_loss(a, p, n, mining=mining), inputs)


STABILITY_LOSSES = [*ALL_LOSSES, pytest.param(triplet_margin_loss, id="triplet_semi_hard")]


@pytest.mark.parametrize("fn", STABILITY_LOSSES)
def test_large_distances_are_finite(fn) -> None:
    g = torch.Generator().manual_seed(2)
    a, p, n = (1e4 * torch.randn(32, 16, generator=g) for _ in range(3))
    for x in (a, p, n):
        x.requires_grad_()
    loss = fn(a, p, n)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(x.grad).all() for x in (a, p, n))


@pytest.mark.parametrize("fn", STABILITY_LOSSES)
def test_zero_distances_have_finite_gradients(fn) -> None:
    base = torch.randn(8, 16)
    a, p, n = (base.clone().requires_grad_() for _ in range(3))
    loss = fn(a, p, n)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(x.grad).all() for x in (a, p, n))


@pytest.mark.parametrize("fn", STABILITY_LOSSES)
def test_bf16_embeddings_give_a_float32_loss(fn) -> None:
    g = torch.Generator().manual_seed(3)
    a, p, n = (torch.randn(16, 16, generator=g) for _ in range(3))
    low = fn(*(x.bfloat16() for x in (a, p, n)))
    assert low.dtype == torch.float32
    # The loss is computed in float32 from the bf16 values: identical to upcasting first.
    assert low.item() == pytest.approx(fn(*(x.bfloat16().float() for x in (a, p, n))).item(), abs=1e-6)


def test_get_loss_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match="unknown loss 'nope'") as exc:
        get_loss("nope")
    for name in LOSSES:
        assert name in str(exc.value)


def test_get_loss_binds_and_validates_options() -> None:
    fn = get_loss("triplet_margin", margin=0.2, mining="hard")
    assert fn(MA, MP, MN).item() == pytest.approx(2.4, abs=1e-9)
    with pytest.raises(ValueError, match="margin"):
        get_loss("softpn", margin=0.2)
    with pytest.raises(ValueError, match="mining"):
        triplet_margin_loss(MA, MP, MN, mining="easy")  # type: ignore[arg-type]


def test_loss_config_matches_params_and_builds(proj) -> None:
    cfg = proj.params.loss
    assert cfg == LossConfig()  # the model's defaults mirror params.yaml
    assert build_loss(cfg)(A, P, N).item() == pytest.approx(LOSSES[cfg.name](A, P, N).item())
    contrastive = build_loss(LossConfig(name="contrastive", margin=2.0))
    assert contrastive(t([[0, 0]]), t([[3, 4]]), t([[0, 1]])).item() == 13.0
    with pytest.raises(ValueError, match="softpn"):
        LossConfig(name="nope")


def test_coverage_loss_hand_computed() -> None:
    tiles = torch.zeros((1, 2, 2, 2), dtype=torch.uint8)
    tiles[0, 0, 0, 0] = 7  # channel 0: 1 of 4 pixels drawn → √0.25 = 0.5; channel 1: nothing → 0
    predicted = torch.tensor([[0.5, 0.1]], requires_grad=True)
    loss = coverage_loss(predicted, tiles)
    assert loss.item() == pytest.approx(0.01)
    loss.backward()
    assert predicted.grad is not None and predicted.grad[0, 1].item() == pytest.approx(0.2)
    head = CoverageHead(embedding_dim=16, channels=12)
    assert head(torch.zeros(3, 16)).shape == (3, 12)
    with pytest.raises(ValueError, match="coverage_weight"):
        LossConfig(coverage_weight=-1.0)
