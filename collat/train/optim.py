"""The optimizer (AdamW; no weight decay on biases, norms, positions and the temperature) and the
learning-rate schedule (linear warmup, then cosine to 0).

AdamW is torch's fused implementation on every device: it takes `found_inf`, a flag on the device
that makes it skip a step (parameters, moments and step count untouched) without the host reading
anything, which is how the training loop keeps a non-finite step from reaching the weights."""
from __future__ import annotations

import math

import torch

from collat.config import TrainConfig

DECAY_GROUP = 0  # param_groups[0] takes weight decay, param_groups[1] does not


def build_optimizer(model: torch.nn.Module, train_config: TrainConfig, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in ("logit_scale",) or "position_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=train_config.lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(train_config))


def lr_schedule(train_config: TrainConfig):
    """step -> multiplier of the peak lr: linear warmup, then cosine to 0 at train_config.steps."""
    def schedule(step: int) -> float:
        if step < train_config.warmup_steps:
            return (step + 1) / train_config.warmup_steps
        progress = (step - train_config.warmup_steps) / max(1, train_config.steps - train_config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return schedule


def apply_schedule(optimizer: torch.optim.Optimizer, scheduler, train_config: TrainConfig) -> None:
    """After loading a checkpoint's optimizer and scheduler: this run's peak lr, weight decay and
    schedule (warmup, steps) from the scheduler's current step on, instead of the saved ones."""
    scheduler.lr_lambdas = [lr_schedule(train_config)] * len(optimizer.param_groups)
    scheduler.base_lrs = [train_config.lr] * len(optimizer.param_groups)
    optimizer.param_groups[DECAY_GROUP]["weight_decay"] = train_config.weight_decay
    for group, base, schedule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * schedule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
