"""The optimizer (AdamW; no weight decay on biases, norms, positions and the temperature) and the
learning-rate schedule (linear warmup, then cosine to 0)."""
from __future__ import annotations

import math

import torch

from collat.config import TrainConfig


def build_optimizer(model: torch.nn.Module, train_config: TrainConfig, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in ("logit_scale",) or "position_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=train_config.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)

    def schedule(step: int) -> float:  # linear warmup, then cosine to 0
        if step < train_config.warmup_steps:
            return (step + 1) / train_config.warmup_steps
        progress = (step - train_config.warmup_steps) / max(1, train_config.steps - train_config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
