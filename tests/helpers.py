"""Helpers shared by the tests: inputs and oracles of the matching ops, and a tiny tone data set
with the configs of the training tests."""
import torch

from collat.config import CoLLATConfig, TrainConfig
from collat.ops import reference
from collat.prompts import make_prompt

METRICS = ("l1", "l2", "cosine")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------ matching
def grid_inputs(B, N, D, dtype=torch.float32, device="cpu", generator=None):
    pred = torch.randint(-8, 9, (B, N, D), generator=generator).float().div(4)
    target = torch.randint(-8, 9, (B, N, D), generator=generator).float().div(4)
    return pred.to(device, dtype), target.to(device, dtype)


def random_lengths(B, N, device="cpu"):
    lengths = torch.randint(0, N + 1, (B,))
    lengths[0] = N  # always one full row and, where there is room, one empty row
    if B > 2:
        lengths[-1] = 0
    return lengths.to(device)


def kernel_distances(target, pred, metric):
    """dist[b, j, i] with the kernels' arithmetic: sequential fp32 sums over D, nothing fused."""
    t, p = target.float(), pred.float()
    B, N, D = t.shape
    acc = torch.zeros(B, N, N)
    for k in range(D):
        tk, pk = t[:, :, None, k], p[:, None, :, k]
        if metric == "l1":
            acc = acc + (tk - pk).abs()
        elif metric == "l2":
            diff = tk - pk
            acc = acc + diff * diff
        else:
            acc = acc + tk * pk
    if metric != "cosine":
        return acc
    t_sq, p_sq = torch.zeros(B, N), torch.zeros(B, N)
    for k in range(D):
        t_sq = t_sq + t[:, :, k] * t[:, :, k]
        p_sq = p_sq + p[:, :, k] * p[:, :, k]
    norms = t_sq.sqrt()[:, :, None] * p_sq.sqrt()[:, None, :]
    return 1.0 - acc / torch.where(norms > reference.COSINE_EPS, norms, torch.full_like(norms, reference.COSINE_EPS))


def assert_valid_perm(perm, lengths, N):
    assert perm.dtype == torch.int64 and perm.shape == (len(lengths), N)
    for row, length in zip(perm.tolist(), lengths.tolist()):
        assert all(v == -1 for v in row[length:])
        valid = row[:length]
        assert all(0 <= v < N for v in valid) and len(set(valid)) == length


def exact_cost(pred, target, perm, metric):
    """Total matched l1 / l2 distance in float64 from explicit differences: exact on grid inputs.

    (reference.assignment_cost takes l2 as cdist(...)**2, whose sqrt rounds: two optimal
    assignments may then differ in their last bits.)"""
    p, t = pred.double(), target.double()
    picked = p.gather(1, perm.clamp_min(0)[..., None].expand(-1, -1, p.shape[-1]))
    diff = t - picked
    per_row = diff.abs().sum(-1) if metric == "l1" else (diff * diff).sum(-1)
    return (per_row * (perm >= 0)).sum(dim=1)


def check_against_scipy(pred, target, lengths, metric, perm, exact):
    pred, target, lengths, perm = pred.cpu(), target.cpu(), lengths.cpu(), perm.cpu()
    assert_valid_perm(perm, lengths, pred.shape[1])
    cost_of = exact_cost if exact else reference.assignment_cost
    cost = cost_of(pred, target, perm, metric)
    best = cost_of(pred, target, reference.optimal_match(pred, target, lengths, metric), metric)
    greedy = cost_of(pred, target, reference.greedy_match(pred, target, lengths, metric), metric)
    if exact:
        assert torch.equal(cost, best)
        assert (cost <= greedy).all()
    else:
        # The kernels' distances differ from the reference's by fp32 summation rounding: an optimum
        # under one set is within twice the summed rounding of the optimum under the other.
        tol = 1e-5 * best.abs() + 1e-5 * lengths.double()
        assert ((cost - best).abs() <= tol).all(), (cost - best).abs().max()
        assert (cost <= greedy + tol).all()


# ------------------------------------------------------------------------------------------ training
SR = 16000
NAMES = ["violin", "flute", "drum", "bell"]


class ToneDataset(torch.utils.data.Dataset):
    """Each class is a pure tone; items are a deterministic function of the index (like SoundfontDataset)."""

    def __init__(self, size=16, seed=0, multi=False):
        self.size, self.seed, self.multi = size, seed, multi
        self.class_names = NAMES

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 100003 + index)
        k = int(torch.randint(2, 4, (1,), generator=g)) if self.multi else 1
        classes = torch.randperm(len(NAMES), generator=g)[:k].tolist()
        t = torch.arange(SR // 2) / SR
        wave = sum(torch.sin(2 * torch.pi * 220.0 * 2 ** c * t) for c in classes) * 0.3
        labels = torch.zeros(len(NAMES))
        labels[classes] = 1.0
        names = [NAMES[c] for c in classes]
        return {"wave": wave.float(), "labels": labels, "text": make_prompt(names), "names": names}


def model_config():
    return CoLLATConfig(audio_size="micro", clip_seconds=0.5, interaction_depth=1, interaction_heads=6,
                        context_length=24, fused=False, lambda_cg=1.0, noisy_fraction=0.5)


def train_config(out, **overrides):
    values = dict(steps=4, batch_size=4, lr=1e-3, warmup_steps=1, amp="none", device="cpu", out=str(out),
                  save_every=2, evaluate=False, progress=False)
    values.update(overrides)
    return TrainConfig(**values)
