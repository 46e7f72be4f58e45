"""Losses over (anchor, positive, negative) embedding batches of shape (B, D).

Every loss returns the MEAN over the batch as a 0-dim tensor. Δ is the Euclidean distance,
computed by `distance` so that its gradient at Δ = 0 is 0 rather than NaN (sqrt'(0) = ∞).

SoftPN (Balntas et al., 2016), the Loc2Vec loss:
    m  = min(Δ(a,n), Δ(p,n))                  – the harder of the two negative distances
    d+ = e^Δ(a,p) / (e^Δ(a,p) + e^m)          – a softmax over (Δ(a,p), m), so large
    d- = e^m      / (e^Δ(a,p) + e^m)            distances never overflow
    L  = d+² + (d- − 1)²                      (= 2·d+², since d- = 1 − d+)

Losses with many negatives (issue 17: a triplet sees one negative; InfoNCE sees the whole batch, VICReg
needs none): `infonce_loss` (NT-Xent over all anchor and positive views of the batch, SimCLR/SupCon) and
`vicreg_loss` (Bardes et al. 2022). Their docstrings say exactly which pairs are positives and negatives.
Batches (training/batches.py) hold L locations × P (anchor, positive) rows; the P anchor rows of a location are
the same tile (their embeddings differ only by the encoder's dropout in training), and each negative row is a
copy, before channel drop, of a positive of another location of the batch. `groups` (B,) is each row's
location, passed by the trainer to every loss that accepts it.

The choice of loss and its knobs live in params.yaml `loss:` (core.config.LossConfig; `build_loss`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from loc2vec.core.config import LOSS_NAMES, LossConfig

Mining = Literal["semi-hard", "hard", "none"]
MINING_CHOICES: tuple[str, ...] = ("semi-hard", "hard", "none")


def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance (B, D), (B, D) → (B,), with a finite (zero) gradient at 0.

    The double `where` keeps sqrt away from 0 in the backward pass too; no epsilon biases
    the value, so hand-computed distances match exactly. Half-precision embeddings (bf16 autocast)
    are upcast: with an 8-bit mantissa the small distance differences the losses compare are noise.
    """
    if x.dtype in (torch.float16, torch.bfloat16) or y.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    sq = (x - y).pow(2).sum(-1)
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def pairwise_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """All-pairs Euclidean distance (B, D), (N, D) → (B, N), safe at 0 like `distance`."""
    return distance(x.unsqueeze(1), y.unsqueeze(0))


def _softpn_parts(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, ...]:
    d_ap = distance(a, p)
    d_n = torch.minimum(distance(a, n), distance(p, n))
    soft = torch.softmax(torch.stack((d_ap, d_n), dim=-1), dim=-1)
    return soft[..., 0], soft[..., 1], d_ap, d_n


def softpn_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """SoftPN: the softmax-ratio loss against the harder of Δ(a,n) and Δ(p,n)."""
    d_pos, d_neg, _, _ = _softpn_parts(a, p, n)
    return (d_pos.pow(2) + (d_neg - 1).pow(2)).mean()


def softmax_ratio_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Hoffer & Ailon's softmax ratio: SoftPN with Δ(a,n) in place of min(Δ(a,n), Δ(p,n))."""
    soft = torch.softmax(torch.stack((distance(a, p), distance(a, n)), dim=-1), dim=-1)
    return (soft[..., 0].pow(2) + (soft[..., 1] - 1).pow(2)).mean()


def mine_negatives(
    a: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    mining: Mining = "semi-hard",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick, for each anchor a_i, a negative embedding (B, D) from the batch (FaceNet mining).

    Candidates for anchor i: its own negative n_i, and p_j and n_j of every OTHER row j ≠ i
    (a_j is left out: it is nearly a copy of p_j). When `groups` (B,) gives each row's location
    id, p_j of a row in i's group is not a candidate (it shows i's own place).
    - "none":      n_i.
    - "hard":      the candidate closest to a_i.
    - "semi-hard": the candidate closest to a_i among those farther than Δ(a_i, p_i)
                   (Δ(a,p) < Δ(a,neg)); if there is none, the farthest candidate
                   (as TensorFlow Addons' triplet_semihard_loss does).
    The choice is made without gradient; the gradient flows through the chosen embedding.
    """
    if mining not in MINING_CHOICES:
        raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(MINING_CHOICES)}")
    if mining == "none":
        return n
    b = a.shape[0]
    cand = torch.cat((p, n), dim=0)  # (2B, D): rows 0..B-1 are positives, B..2B-1 negatives
    with torch.no_grad():
        d = pairwise_distance(a, cand)  # (B, 2B)
        eye = torch.eye(b, dtype=torch.bool, device=a.device)
        own_p = torch.cat((eye, torch.zeros_like(eye)), dim=1)
        valid = ~own_p  # p_i is never a negative; n_i and every other row's p_j, n_j are
        if groups is not None:
            same = (groups.view(-1, 1) == groups.view(1, -1)) & ~eye
            valid &= ~torch.cat((same, torch.zeros_like(same)), dim=1)
        inf = torch.full_like(d, float("inf"))
        hardest = torch.where(valid, d, inf).argmin(dim=1)
        if mining == "hard":
            idx = hardest
        else:
            d_ap = distance(a, p).unsqueeze(1)
            semi = valid & (d > d_ap)
            semi_idx = torch.where(semi, d, inf).argmin(dim=1)
            easiest = torch.where(valid, d, -inf).argmax(dim=1)
            idx = torch.where(semi.any(dim=1), semi_idx, easiest)
    return cand[idx]


def triplet_margin_loss(
    a: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    margin: float = 0.2,
    mining: Mining = "semi-hard",
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """FaceNet's hinge: mean(max(0, Δ(a,p) − Δ(a,neg) + margin)), neg from `mine_negatives`."""
    neg = mine_negatives(a, p, n, mining=mining, groups=groups)
    return F.relu(distance(a, p) - distance(a, neg) + margin).mean()


def contrastive_loss(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Hadsell et al.: mean(½Δ(a,p)² + ½max(0, margin − Δ(a,n))²) – pull pairs, push non-pairs past margin."""
    return (0.5 * distance(a, p).pow(2) + 0.5 * F.relu(margin - distance(a, n)).pow(2)).mean()


def _upcast(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Half-precision embeddings (bf16 autocast) in float32 (as `distance` does)."""
    return tuple(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x for x in xs)


def infonce_loss(
    a: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    temperature: float = 0.1,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """NT-Xent over all 2B views of the batch, with every view of the same location a positive (SupCon, L_out).

    Views: the B anchors and the B positives, v = [a_1 … a_B, p_1 … p_B], row i's location g_i = groups[i]
    (default: every row its own location, i.e. SimCLR's pairs). Similarity s_ij = cos(v_i, v_j) / temperature.
    For view i:
      positives P(i) = { j ≠ i : g_j = g_i }  – its pair, and with P pairs per location the other P − 1 anchor
                       rows and P − 1 positives of its location (2P − 1 in all)
      negatives      = { j : g_j ≠ g_i }      – every view of every other location: 2(L − 1)P of them,
                       against the single negative of a triplet
      ℓ_i = − mean_{j ∈ P(i)} log( e^{s_ij} / Σ_{k ≠ i} e^{s_ik} )
    The loss is mean_i ℓ_i. `n` is not used: each of its rows copies a positive of another location, which is
    among the views already. Under DDP each rank contrasts its own slice of the batch.
    Cosine similarity makes the loss blind to each view's scale; the embedding's length is left free.
    """
    a, p = _upcast(a, p)
    b = a.shape[0]
    g = torch.arange(b, device=a.device) if groups is None else groups.to(a.device).view(-1)
    if g.shape[0] != b:
        raise ValueError(f"groups has {g.shape[0]} rows for a batch of {b}")
    v = F.normalize(torch.cat((a, p)), dim=1)
    gv = torch.cat((g, g))
    eye = torch.eye(2 * b, dtype=torch.bool, device=a.device)
    sim = (v @ v.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (gv.view(-1, 1) == gv.view(1, -1)) & ~eye
    per_view = -log_prob.masked_fill(~pos, 0.0).sum(dim=1) / pos.sum(dim=1)
    return per_view.mean()


def vicreg_loss(
    a: torch.Tensor,
    p: torch.Tensor,
    n: torch.Tensor,
    invariance: float = 25.0,
    variance: float = 25.0,
    covariance: float = 1.0,
) -> torch.Tensor:
    """VICReg (Bardes, Ponce & LeCun 2022), as its official code computes it, with the (a_i, p_i) rows as pairs.

    Positives: a_i and p_i (the invariance term, MSE over rows and dimensions). No negatives: collapse is
    prevented by keeping each dimension's std over the batch of each branch (anchors; positives) at ≥ 1
    (the variance term, the hinge mean(relu(1 − √(var + 1e-4))), halved per branch) and by decorrelating
    the dimensions (the covariance term, the off-diagonal covariances squared, summed and divided by D,
    per branch). L = invariance·inv + variance·var + covariance·cov. The anchor branch holds each location's
    anchor P times, so its spread is that of L locations. `n` is not used. Needs B ≥ 2.
    """
    a, p = _upcast(a, p)
    b, d = a.shape
    if b < 2:
        raise ValueError("vicreg needs at least 2 rows (it measures the spread over the batch)")
    inv = F.mse_loss(a, p)
    var = a.new_zeros(())
    cov = a.new_zeros(())
    off = ~torch.eye(d, dtype=torch.bool, device=a.device)
    for z in (a, p):
        z = z - z.mean(dim=0)
        var = var + F.relu(1 - torch.sqrt(z.var(dim=0) + 1e-4)).mean() / 2
        c = z.T @ z / (b - 1)
        cov = cov + c[off].pow(2).sum() / d
    return invariance * inv + variance * var + covariance * cov


@torch.no_grad()
def softpn_terms(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch means of SoftPN's d+ and d- and of the two distances, for logging (detached)."""
    d_pos, d_neg, d_ap, d_n = _softpn_parts(a, p, n)
    return {"d_pos": d_pos.mean(), "d_neg": d_neg.mean(), "dist_ap": d_ap.mean(), "dist_neg": d_n.mean()}


@torch.no_grad()
def triplet_accuracy(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Fraction of triplets with Δ(a,p) < min(Δ(a,n), Δ(p,n)), as a 0-dim float tensor."""
    ok = distance(a, p) < torch.minimum(distance(a, n), distance(p, n))
    return ok.float().mean()


LossFn = Callable[..., torch.Tensor]
LOSSES: dict[str, LossFn] = {
    "softpn": softpn_loss,
    "softmax_ratio": softmax_ratio_loss,
    "triplet_margin": triplet_margin_loss,
    "contrastive": contrastive_loss,
    "infonce": infonce_loss,
    "vicreg": vicreg_loss,
}
assert tuple(LOSSES) == LOSS_NAMES, "core.config.LOSS_NAMES must name exactly the losses defined here"
# Losses that never read `n` (their docstrings say why): the trainer does not encode the batch's negatives for them.
NEGATIVE_FREE: frozenset[str] = frozenset({"infonce", "vicreg"})


def get_loss(name: str, **kwargs: object) -> LossFn:
    """The loss called `name`, with `kwargs` (e.g. margin) bound; unknown names or kwargs raise ValueError."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))}")
    fn = LOSSES[name]
    accepted = set(list(inspect.signature(fn).parameters)[3:])
    bad = set(kwargs) - accepted
    if bad:
        raise ValueError(f"loss {name!r} takes no {sorted(bad)}; it accepts {sorted(accepted) or 'no options'}")
    return partial(fn, **kwargs) if kwargs else fn


def build_loss(cfg: LossConfig) -> LossFn:
    """The configured loss with only the options it accepts bound, called as fn(a, p, n, groups=None).

    `groups` (each row's location) reaches the losses that take it (infonce, triplet_margin's mining).
    """
    accepted = set(list(inspect.signature(LOSSES[cfg.name]).parameters)[3:])
    knobs = {
        "margin": cfg.margin,
        "mining": cfg.mining,
        "temperature": cfg.temperature,
        "invariance": cfg.vicreg_invariance,
        "variance": cfg.vicreg_variance,
        "covariance": cfg.vicreg_covariance,
    }
    fn = get_loss(cfg.name, **{k: v for k, v in knobs.items() if k in accepted})
    if "groups" in accepted:
        return fn

    def without_groups(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, groups: torch.Tensor | None = None):
        return fn(a, p, n)

    return without_groups
