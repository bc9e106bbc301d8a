"""The custom ops of collat: the only place that validates their inputs and picks a backend.

    greedy_match / optimal_match   token matching (compiled C++/CUDA, collat._C)      matching.py
    token_l1_loss                  matched token L1 loss (Triton)                      token_l1.py
    cross_attention                attention with a key padding mask (Triton)          attention.py

Each front falls back to a correct implementation where its backend is missing (the plain-PyTorch
reference in reference.py, or SDPA for attention). `FUSED` and `REFERENCE` bundle one implementation
of every op, so a model switches between the kernels and the references with one object.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, get_args

import torch

from collat.ops import reference
from collat.ops.attention import cross_attention
from collat.ops.matching import greedy_match, optimal_match
from collat.ops.token_l1 import token_l1_loss

Metric = reference.Metric
METRICS = reference.METRICS
Matching = Literal["greedy", "optimal"]
MATCHINGS = get_args(Matching)


@dataclass(frozen=True)
class OpSet:
    """One implementation of every op the model calls: the fused kernels or the plain references."""

    name: str
    greedy_match: Callable
    optimal_match: Callable
    token_l1_loss: Callable
    cross_attention: Callable

    @property
    def fused(self) -> bool:
        return self is FUSED

    def match(self, pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1",
              method: str = "greedy", **options) -> torch.Tensor:
        """greedy_match or optimal_match, chosen by `method` ("greedy" is the paper's)."""
        if method not in MATCHINGS:
            raise ValueError(f"match: the matching method must be one of {MATCHINGS}, got {method!r}")
        fn = self.greedy_match if method == "greedy" else self.optimal_match
        return fn(pred, target, lengths, metric, **options)


FUSED = OpSet("fused", greedy_match, optimal_match, token_l1_loss, cross_attention)
REFERENCE = OpSet("reference", reference.greedy_match, reference.optimal_match, reference.token_l1_loss,
                  reference.cross_attention)
match = FUSED.match


def op_set(choice: "bool | str | OpSet") -> OpSet:
    """The op set for fused=True/False, a name ("fused", "reference") or an OpSet itself."""
    if isinstance(choice, OpSet):
        return choice
    if isinstance(choice, bool):
        return FUSED if choice else REFERENCE
    by_name = {FUSED.name: FUSED, REFERENCE.name: REFERENCE}
    if choice not in by_name:
        raise ValueError(f"ops must be one of {sorted(by_name)} or an OpSet, got {choice!r}")
    return by_name[choice]


__all__ = ["greedy_match", "optimal_match", "match", "token_l1_loss", "cross_attention", "OpSet", "FUSED",
           "REFERENCE", "op_set", "Metric", "METRICS", "Matching", "MATCHINGS"]
