"""Loads the compiled extension collat._C (which registers torch.ops.collat.*), if it was built."""
from __future__ import annotations

import warnings

import torch

try:
    from collat import _C  # noqa: F401  (import registers the ops)

    HAS_EXTENSION = True
    EXTENSION_ERROR = None
except ImportError as error:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = error
    warnings.warn(
        f"collat._C is not available ({error}); greedy_match and optimal_match fall back to the slow "
        "PyTorch reference. Build it with: pip install --no-build-isolation -e .",
        stacklevel=2,
    )


def has_kernel(op: str, device_type: str) -> bool:
    """True when torch.ops.collat.<op> has a compiled kernel for this device type ('cpu' or 'cuda')."""
    if not HAS_EXTENSION:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"collat::{op}", key)
