"""Front of the matching ops (greedy_match, optimal_match): validation and dispatch.

Provisional version: dispatches to torch.ops.collat.* when the extension has a kernel for the
device, else to the reference. The matching helper owns and extends this file.
"""
from __future__ import annotations

import torch

from collat import _ext, reference


def greedy_match(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    if _ext.has_kernel("greedy_match", pred.device.type):
        return torch.ops.collat.greedy_match(pred, target, lengths, metric)
    return reference.greedy_match(pred, target, lengths, metric)


def optimal_match(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1") -> torch.Tensor:
    if _ext.has_kernel("optimal_match", pred.device.type):
        return torch.ops.collat.optimal_match(pred, target, lengths, metric)
    return reference.optimal_match(pred, target, lengths, metric)
