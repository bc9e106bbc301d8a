"""Plain-PyTorch references of every custom op.

These are the oracles the tests compare against and the baselines the benchmarks time.
They favour obviousness over speed; none of them validates its inputs (the op fronts do).
"""
from __future__ import annotations

import math
from typing import Literal, get_args

import torch

Metric = Literal["l1", "l2", "cosine"]
METRICS = get_args(Metric)
COSINE_EPS = 1e-8


def pairwise_distance(target: torch.Tensor, pred: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """dist[b, j, i] between target row j and predicted row i, computed in fp32.

    l1 = sum |t - p|, l2 = sum (t - p)^2 (squared Euclidean), cosine = 1 - t.p / max(|t| |p|, eps).
    """
    t = target.float()
    p = pred.float()
    if metric == "l1":
        return torch.cdist(t, p, p=1.0)
    if metric == "l2":
        # Explicit difference form: the matmul expansion |t|^2 - 2 t.p + |p|^2 cancels badly.
        return torch.cdist(t, p, p=2.0, compute_mode="donot_use_mm_for_euclid_dist").square()
    if metric == "cosine":
        dot = torch.bmm(t, p.transpose(1, 2))
        norms = t.norm(dim=-1)[:, :, None] * p.norm(dim=-1)[:, None, :]
        return 1.0 - dot / norms.clamp_min(COSINE_EPS)
    raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def greedy_match(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Greedy right-to-left matching of docs/design.md §2.

    For every item b, text tokens j = L_b-1 .. 0 each take the closest predicted token i that is
    not yet taken (ties to the smallest i; a NaN distance counts as +inf, as in the kernels, so a
    row is always matched). Returns perm int64 [B, N]; perm[b, j] = -1 for j >= L_b.
    """
    B, N, _ = target.shape
    perm = torch.full((B, N), -1, dtype=torch.int64, device=target.device)
    if B == 0 or N == 0:
        return perm
    dist = pairwise_distance(target, pred, metric).nan_to_num(nan=math.inf, posinf=math.inf)
    lengths = lengths.to(device=target.device, dtype=torch.int64)
    taken = torch.zeros(B, pred.shape[1], dtype=torch.bool, device=target.device)
    rows = torch.arange(B, device=target.device)
    for j in range(N - 1, -1, -1):
        active = j < lengths
        d = dist[:, j, :].masked_fill(taken, math.inf)
        closest = (d == d.amin(dim=-1, keepdim=True)) & ~taken
        best = closest.int().argmax(dim=-1)  # the first untaken minimum (also when every distance is inf)
        perm[:, j] = torch.where(active, best, perm[:, j])
        taken[rows[active], best[active]] = True
    return perm


def assignment_cost(pred: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Total matched distance per item, float64 [B]: sum over valid j of dist(target[b, j], pred[b, perm[b, j]])."""
    dist = pairwise_distance(target, pred, metric).double()
    valid = perm >= 0
    picked = dist.gather(2, perm.clamp_min(0)[..., None])[..., 0]
    return (picked * valid).sum(dim=1)


def optimal_match(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    """Exact rectangular assignment per item with scipy's linear_sum_assignment (the oracle). As in
    the kernels, a NaN cost counts as the largest finite fp32 value and infinities are clamped to it,
    so that every problem stays feasible."""
    from scipy.optimize import linear_sum_assignment

    B, N, _ = target.shape
    perm = torch.full((B, N), -1, dtype=torch.int64)
    if B == 0 or N == 0:
        return perm.to(target.device)
    largest = torch.finfo(torch.float32).max
    dist = pairwise_distance(target, pred, metric).nan_to_num(nan=largest, posinf=largest, neginf=-largest)
    dist = dist.double().cpu().numpy()
    for b, length in enumerate(lengths.tolist()):
        if length == 0:
            continue
        rows, cols = linear_sum_assignment(dist[b, :length, :])
        perm[b, torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    return perm.to(target.device)


def token_l1_loss(pred: torch.Tensor, target: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """L_ct: sum over valid (b, j) of |pred[b, perm[b, j]] - target[b, j]|_1 / (D * #valid); 0 if none.

    An entry is valid when 0 <= perm[b, j] < Np; any other value (-1, or out of range) is ignored,
    as in the kernels; what invalid target rows and unmatched predicted rows hold (even NaN) never
    reaches the loss. Returns an fp32 scalar (float64 when an input is float64). Differentiable in
    pred and target.
    """
    B, num_pred, D = pred.shape
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    valid = (perm >= 0) & (perm < num_pred)
    if num_pred == 0:  # nothing can be valid; gather needs a row to point the invalid entries at
        pred = torch.cat([pred, pred.new_zeros(B, 1, D)], dim=1)
    index = torch.where(valid, perm, 0)[..., None].expand(-1, -1, D)
    gathered = pred.gather(1, index).to(acc)
    per_token = torch.where(valid, (gathered - target.to(acc)).abs().sum(dim=-1), 0)
    count = valid.sum()
    return per_token.sum() / (count.clamp_min(1) * D).to(acc)


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q [B, H, Nq, d], k/v [B, H, Nk, d].

    key_padding_mask: bool [B, Nk], True = padding key (ignored: whatever its k and v hold, even NaN,
    never reaches an output, and it gets zero gradients). A row with every key masked, or with no key
    at all, gives zeros (and zero gradients), not NaN. Computed in the inputs' dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    if key_padding_mask is not None:
        padding = key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if k.shape[-2] == 0:
        return torch.matmul(scores, v)  # no keys: zeros [B, H, Nq, d]
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max).detach()
    weights = torch.exp(scores - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    probs = weights / torch.where(denom == 0, torch.ones_like(denom), denom)
    return torch.matmul(probs, v)
