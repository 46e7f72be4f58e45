"""Losses: hand-computed values, an independent SoftPN, gradcheck, invariances and numerical stability."""

from __future__ import annotations

import math

import pytest
import torch

from loc2vec.core.config import LossConfig
from loc2vec.training.losses import (
    LOSSES,
    build_loss,
    contrastive_loss,
    distance,
    get_loss,
    infonce_loss,
    mine_negatives,
    softmax_ratio_loss,
    softpn_loss,
    softpn_terms,
    triplet_accuracy,
    triplet_margin_loss,
    vicreg_loss,
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
    pytest.param(lambda a, p, n: infonce_loss(a, p, n, temperature=0.5), id="infonce"),
    pytest.param(lambda a, p, n: infonce_loss(a, p, n, 0.5, torch.arange(len(a)) // 2), id="infonce_groups"),
    pytest.param(vicreg_loss, id="vicreg"),
]


@pytest.mark.parametrize("fn", ALL_LOSSES)
def test_gradcheck(fn) -> None:
    g = torch.Generator().manual_seed(1)
    inputs = tuple(torch.randn(5, 4, generator=g, dtype=F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_vicreg_with_every_variance_hinge_active() -> None:
    g = torch.Generator().manual_seed(7)
    inputs = tuple((0.3 * torch.randn(6, 4, generator=g, dtype=F64)).requires_grad_() for _ in range(3))
    assert all(float(x.detach().std(dim=0).max()) < 0.9 for x in inputs[:2])  # far from the hinge's kink at std = 1
    assert torch.autograd.gradcheck(vicreg_loss, inputs)


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
    assert a.grad is not None and p.grad is not None  # n has none where the loss does not use it
    assert all(x.grad is None or torch.isfinite(x.grad).all() for x in (a, p, n))


@pytest.mark.parametrize("fn", STABILITY_LOSSES)
def test_zero_distances_have_finite_gradients(fn) -> None:
    base = torch.randn(8, 16)
    a, p, n = (base.clone().requires_grad_() for _ in range(3))
    loss = fn(a, p, n)
    loss.backward()
    assert torch.isfinite(loss)
    assert a.grad is not None and p.grad is not None  # n has none where the loss does not use it
    assert all(x.grad is None or torch.isfinite(x.grad).all() for x in (a, p, n))


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


# ---------------------------------------------------------------- losses with many negatives


def test_infonce_hand_computed() -> None:
    # a = p = [e1, e2]: views v = [e1, e2, e1, e2], cos(v0, ·) = (·, 0, 1, 0).
    # Every row its own location: view 0's one positive is view 2; its denominator over k ≠ 0 is
    # e^{0/τ} + e^{1/τ} + e^{0/τ}. ℓ = −(1/τ − log(2 + e^{1/τ})), the same for all four views by symmetry.
    #   τ = 1:   log(2 + e) − 1    = 0.5514450
    #   τ = 0.5: log(2 + e²) − 2   = 0.2395292
    a = t([[1, 0], [0, 1]])
    p = t([[1, 0], [0, 1]])
    assert math.log(2 + math.e) - 1 == pytest.approx(0.5514450, abs=1e-6)
    assert infonce_loss(a, p, a, temperature=1.0).item() == pytest.approx(0.5514450, abs=1e-6)
    assert infonce_loss(a, p, a, temperature=0.5).item() == pytest.approx(math.log(2 + math.e**2) - 2, abs=1e-9)
    # Both rows one location: view 0's positives are views 1, 2, 3 with log-probabilities
    # −log(2+e), 1 − log(2+e), −log(2+e): ℓ = log(2 + e) − 1/3 = 1.2181117.
    same = infonce_loss(a, p, a, temperature=1.0, groups=torch.tensor([4, 4]))
    assert same.item() == pytest.approx(math.log(2 + math.e) - 1 / 3, abs=1e-9)
    # Negatives (n) are not used: every negative row copies a view of another location.
    assert infonce_loss(a, p, 5 * a + 3, temperature=1.0).item() == pytest.approx(0.5514450, abs=1e-6)


def test_infonce_matches_an_independent_supcon() -> None:
    g = torch.Generator().manual_seed(4)
    a, p, n = (torch.randn(12, 8, generator=g, dtype=F64) for _ in range(3))
    groups = torch.arange(12) // 3  # 4 locations × 3 pairs, as batches.py orders them

    def reference() -> float:
        views = [x / x.norm() for x in (*a, *p)]
        gv = [*groups.tolist(), *groups.tolist()]
        total = 0.0
        for i, vi in enumerate(views):
            denom = sum(math.exp(float(vi @ vk) / 0.2) for k, vk in enumerate(views) if k != i)
            pos = [k for k in range(len(views)) if k != i and gv[k] == gv[i]]
            total += -sum(float(vi @ views[k]) / 0.2 - math.log(denom) for k in pos) / len(pos)
        return total / len(views)

    assert infonce_loss(a, p, n, temperature=0.2, groups=groups).item() == pytest.approx(reference(), abs=1e-9)


def test_infonce_invariances() -> None:
    g = torch.Generator().manual_seed(5)
    a, p, n = (torch.randn(10, 6, generator=g, dtype=F64) for _ in range(3))
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    base = infonce_loss(a, p, n, temperature=0.3, groups=groups).item()
    perm = torch.randperm(10, generator=g)
    permuted = infonce_loss(a[perm], p[perm], n[perm], temperature=0.3, groups=groups[perm]).item()
    assert permuted == pytest.approx(base, abs=1e-12)  # the order of the batch's rows
    relabelled = infonce_loss(a, p, n, temperature=0.3, groups=groups * 17 + 5).item()
    assert relabelled == pytest.approx(base, abs=1e-12)  # location ids are labels only
    scale = torch.rand(10, 1, generator=g, dtype=F64) + 0.1
    assert infonce_loss(a * scale, p * 3, n, temperature=0.3, groups=groups).item() == pytest.approx(base, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))
    rotated = infonce_loss(a @ q, p @ q, n @ q, temperature=0.3, groups=groups).item()
    assert rotated == pytest.approx(base, abs=1e-12)  # cosine similarity: any rotation of the space
    # swapping anchors and positives swaps the two halves of the views: the same set of terms
    assert infonce_loss(p, a, n, temperature=0.3, groups=groups).item() == pytest.approx(base, abs=1e-12)
    with pytest.raises(ValueError, match="groups"):
        infonce_loss(a, p, n, groups=groups[:4])


def test_vicreg_hand_computed() -> None:
    # a = [(1, 1), (−1, −1)], p = [(1, 0), (−1, 0)] (both already centred):
    # invariance: MSE of (0, 1), (0, −1) over 4 numbers = 0.5
    # variance (unbiased, B − 1 = 1): a has var 2 in both dims → std √2.0001 > 1 → hinge 0;
    #           p: dim 0 var 2 → 0, dim 1 var 0 → std √1e-4 = 0.01 → 0.99; mean over dims 0.495;
    #           halved per branch: 0/2 + 0.495/2 = 0.2475
    # covariance: a's C = [[2, 2], [2, 2]] → off-diagonal 2² + 2² = 8, / D = 4; p's C = [[2, 0], [0, 0]] → 0
    # L = 25·0.5 + 25·0.2475 + 1·4 = 22.6875
    a = t([[1, 1], [-1, -1]])
    p = t([[1, 0], [-1, 0]])
    assert vicreg_loss(a, p, p).item() == pytest.approx(22.6875, abs=1e-9)
    assert vicreg_loss(a, p, p, invariance=1.0, variance=0.0, covariance=0.0).item() == pytest.approx(0.5)
    assert vicreg_loss(a, p, p, invariance=0.0, variance=1.0, covariance=0.0).item() == pytest.approx(0.2475)
    assert vicreg_loss(a, p, p, invariance=0.0, variance=0.0, covariance=1.0).item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        vicreg_loss(a[:1], p[:1], p[:1])


def test_vicreg_invariances() -> None:
    g = torch.Generator().manual_seed(6)
    a, p, n = (torch.randn(10, 6, generator=g, dtype=F64) for _ in range(3))
    base = vicreg_loss(a, p, n).item()
    perm = torch.randperm(10, generator=g)
    assert vicreg_loss(a[perm], p[perm], n[perm]).item() == pytest.approx(base, abs=1e-12)
    shift = torch.randn(1, 6, generator=g, dtype=F64)
    assert vicreg_loss(a + shift, p + shift, n).item() == pytest.approx(base, abs=1e-12)  # a common translation
    assert vicreg_loss(p, a, n).item() == pytest.approx(base, abs=1e-12)  # the two branches are symmetric
    assert vicreg_loss(a, p, 100 * n).item() == base  # n is not used


def test_new_losses_are_selectable_by_params() -> None:
    a, p = t([[1, 0], [0, 1]]), t([[1, 0], [0, 1]])
    infonce = build_loss(LossConfig(name="infonce", temperature=0.5))
    assert infonce(a, p, a).item() == pytest.approx(math.log(2 + math.e**2) - 2, abs=1e-9)
    assert infonce(a, p, a, groups=torch.tensor([1, 1])).item() != infonce(a, p, a).item()
    vicreg = build_loss(LossConfig(name="vicreg", vicreg_invariance=0.0, vicreg_variance=0.0, vicreg_covariance=1.0))
    assert vicreg(t([[1, 1], [-1, -1]]), t([[1, 0], [-1, 0]]), a, groups=torch.tensor([0, 1])).item() == 4.0
    with pytest.raises(ValueError, match="temperature"):
        LossConfig(name="infonce", temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        get_loss("softpn", temperature=0.1)
