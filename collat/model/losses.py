"""The three CoLLAT losses (paper section 3.2-3.4, docs/design.md §2).

L_ct  cross-modal token loss: match predicted tokens to text tokens (greedy right-to-left, or
      optimal), then the mean L1 distance of the matched pairs. The matching is not differentiated.
L_cg  global contrastive loss: symmetric cross-entropy over exp(t) * z_a z_t^T with a learnable,
      clamped temperature; features are gathered across ranks exactly as open_clip's ClipLoss does.
L_ut  unimodal token loss: mean |h_at - h~_at| over all elements, h~_at from noisy audio.

Under a process group (torchrun, one DistributedDataParallel replica per rank) every loss returns this
rank's SHARE of the global loss: the mean of the shares over the ranks is the loss of the global batch,
and DDP's gradient average (sum over ranks / K) is the gradient of the global loss. L_ct and L_ut are
per-token means whose token counts differ between ranks (prompt lengths), so they are normalised by
the global count (one all_reduce of the count) and scaled by K; L_cg follows open_clip (exact with
gather_with_grad=True; without it the feature gradients are those of open_clip's default, 1/K of the
global loss's, while the loss value and the temperature gradient stay exact).

`ops` (collat.ops.FUSED or REFERENCE) selects the implementation of the matching and the token L1 loss.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from collat.ops import FUSED, OpSet, op_set

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share_of_global_mean(local_mean: torch.Tensor, local_count) -> torch.Tensor:
    """This rank's share of a mean over the global batch, given its local mean over local_count items.

    With S_r the rank's sum and C the global count, the global mean is sum_r S_r / C. DDP averages the
    ranks' gradients, so each rank contributes K * S_r / C = local_mean * K * local_count / C; the mean
    of the shares over the ranks is the global mean. A rank without items contributes 0.
    In a single process this is local_mean itself.
    """
    _, world_size = distributed_world()
    if world_size == 1:
        return local_mean
    if isinstance(local_count, torch.Tensor):
        count = local_count.to(device=local_mean.device, dtype=torch.float64).reshape(())
    else:  # a Python count: filled on the device (as_tensor would copy from the host, a sync on a GPU)
        count = torch.full((), float(local_count), dtype=torch.float64, device=local_mean.device)
    total = count.clone()
    dist.all_reduce(total)
    return local_mean * (world_size * count / total.clamp(min=1.0)).to(local_mean.dtype)


def cross_token_loss(h_at: torch.Tensor, h_t: torch.Tensor, lengths: torch.Tensor, matching: str = "greedy",
                     metric: str = "l1", ops: OpSet | str = FUSED, check_lengths: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """L_ct and the permutation used. h_at [B, N, D] (predicted), h_t [B, N, D] (text, no grad), lengths [B].

    check_lengths=False skips the matcher's range check of lengths (a host sync on a GPU) where the
    matcher offers it, for lengths that come from a token mask and so lie in [0, N].
    Under a process group the loss is this rank's share of the global L_ct (see the module docstring)."""
    ops = op_set(ops)
    options = {} if check_lengths else _unchecked_options(ops, matching)
    with torch.no_grad():  # the matching is not differentiated
        perm = ops.match(h_at.detach(), h_t.detach(), lengths, metric, matching, **options)
    loss = ops.token_l1_loss(h_at, h_t, perm)
    return share_of_global_mean(loss, (perm >= 0).sum()), perm


def _unchecked_options(ops: OpSet, matching: str) -> dict:
    """{"check_lengths": False} for a matcher that takes it (the fused ops); {} for one that does not (the
    references, which take lengths as they are)."""
    matcher = ops.greedy_match if matching == "greedy" else ops.optimal_match
    return {"check_lengths": False} if _takes_keyword(matcher, "check_lengths") else {}


@functools.lru_cache(maxsize=None)
def _takes_keyword(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def unimodal_token_loss(h_clean: torch.Tensor, h_noisy: torch.Tensor, ops: OpSet | str = FUSED) -> torch.Tensor:
    """L_ut = mean |h_clean - h_noisy| over all B*N*D elements (token L1 with the identity permutation).

    Under a process group the loss is this rank's share of the global L_ut (see the module docstring)."""
    B, N, _ = h_clean.shape
    identity = torch.arange(N, device=h_clean.device).expand(B, N).contiguous()
    loss = op_set(ops).token_l1_loss(h_noisy, h_clean, identity)
    return share_of_global_mean(loss, B * N)


def gather_features(audio_features: torch.Tensor, text_features: torch.Tensor, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0, world_size: int = 1):
    """All ranks' features, as open_clip's `gather_features` (without horovod)."""
    if gather_with_grad:
        # (`import torch.distributed.nn` here would make `torch` a local name of this whole function.)
        from torch.distributed.nn import all_gather as all_gather_with_grad

        all_audio = torch.cat(all_gather_with_grad(audio_features), dim=0)
        all_text = torch.cat(all_gather_with_grad(text_features), dim=0)
        return all_audio, all_text
    gathered_audio = [torch.zeros_like(audio_features) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gathered_audio, audio_features)
    dist.all_gather(gathered_text, text_features)
    if not local_loss:
        # all_gather has no gradient: put the local tensors back so this rank's features keep theirs.
        gathered_audio[rank] = audio_features
        gathered_text[rank] = text_features
    return torch.cat(gathered_audio, dim=0), torch.cat(gathered_text, dim=0)


class ContrastiveLoss(nn.Module):
    """L_cg: open_clip's ClipLoss for (audio, text). Inputs must already be L2-normalised.

    In a single process (or without an initialised process group) the gather is a no-op.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    @staticmethod
    def world() -> tuple[int, int]:
        return distributed_world()

    def forward(self, audio_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        rank, world_size = self.world()
        if world_size > 1:
            all_audio, all_text = gather_features(
                audio_features, text_features, self.local_loss, self.gather_with_grad, rank, world_size
            )
            if self.local_loss:
                logits_per_audio = logit_scale * audio_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_audio.T
            else:
                logits_per_audio = logit_scale * all_audio @ all_text.T
                logits_per_text = logits_per_audio.T
        else:
            logits_per_audio = logit_scale * audio_features @ text_features.T
            logits_per_text = logits_per_audio.T
        n = logits_per_audio.shape[0]
        labels = torch.arange(n, device=audio_features.device)
        if world_size > 1 and self.local_loss:
            labels = labels + n * rank
        return (F.cross_entropy(logits_per_audio, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clamped_logit_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """exp(t) with t clamped to <= ln 100 (the gradient stops at the clamp, as in CLIP)."""
    return log_scale.clamp(max=LOGIT_SCALE_MAX).exp()
