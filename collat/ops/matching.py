"""Token matching ops: greedy right-to-left (the paper's g, docs/design.md §2) and optimal.

    perm = greedy_match(pred, target, lengths, metric="l1")    # or optimal_match

pred (the predicted tokens h_at) and target (the text tokens h_t) are [B, N, D]; lengths [B] gives
the number L_b of valid text tokens (a prefix of each row). perm is int64 [B, N]: perm[b, j] is the
predicted row matched to text row j, -1 for j >= L_b. Distances (fp32 accumulation): "l1" = sum
|t - p|, "l2" = squared Euclidean, "cosine" = 1 - cos. Greedy takes j = L_b-1 down to 0, each the
closest untaken predicted row (ties to the smallest index); optimal minimises the total distance.

Each call validates its inputs (the range check of lengths costs one host sync on a GPU;
check_lengths=False skips it and clamps lengths into [0, N] instead), then runs the compiled kernel
of collat._C for the device (C++ on CPU, CUDA on GPU) or, where that is missing, the plain-PyTorch
reference (collat.reference). Both kernels compute every distance as one sequential fp32 sum over
D, so their greedy perms are bit-identical, and match the reference exactly wherever the
reference's own rounding does not flip a near-tie. Their optimal perms have the same (minimum)
cost; they may differ only between assignments of exactly equal cost, as the two solvers start
differently (fp32 distances put totals on a grid, so such ties occur even on continuous inputs).
The matching is not differentiable (perm is an index tensor).
"""
from __future__ import annotations

import torch

from collat.ops import _ext, reference

METRICS = reference.METRICS
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MAX_N = 1024  # the CUDA kernels keep a lane's taken-columns set in one 32-bit mask

# Resolved once at import: the dispatcher query returns a bool, which torch.compile cannot trace.
_KERNELS: dict[tuple[str, str], bool] = {
    (op, device_type): _ext.has_kernel(op, device_type)
    for op in ("greedy_match", "optimal_match")
    for device_type in ("cpu", "cuda")
}


def _has_kernel(op: str, device_type: str) -> bool:
    """Whether collat._C has a compiled kernel of `op` for this device type (a plain lookup)."""
    return _KERNELS.get((op, device_type), False)


def _validate(op: str, pred, target, lengths, metric, check_lengths: bool = True):
    """Checks the arguments; returns (pred, target, lengths): pred and target in one dtype the kernels
    take, lengths clamped into [0, N] where its range is not checked."""
    for name, value in (("pred", pred), ("target", target), ("lengths", lengths)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if pred.dim() != 3:
        raise ValueError(f"{op}: pred must have shape [B, N, D] (3 dims), got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(
            f"{op}: target must have pred's shape [B, N, D] = {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    B, N, _ = pred.shape
    if lengths.shape != (B,):
        raise ValueError(f"{op}: lengths must have shape [B] = ({B},), got {tuple(lengths.shape)}")
    if lengths.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: lengths must be int32 or int64, got {lengths.dtype}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if not (target.device == pred.device == lengths.device):
        raise ValueError(
            f"{op}: pred, target and lengths must be on one device, got {pred.device}, {target.device}, "
            f"{lengths.device}"
        )
    for name, value in (("pred", pred), ("target", target)):
        if not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {value.dtype}")
    if pred.dtype != target.dtype or pred.dtype not in KERNEL_DTYPES:
        # The reference computes in fp32 from .float() of each input: so do the kernels.
        pred, target = pred.float(), target.float()
    if pred.device.type == "cuda" and N > CUDA_MAX_N:
        raise ValueError(f"{op}: the CUDA kernel supports N <= {CUDA_MAX_N}, got N = {N}")
    if not check_lengths or torch.compiler.is_compiling():
        # No host sync: out-of-range lengths are clamped, the same on every backend.
        return pred, target, lengths.clamp(0, N)
    if B > 0:
        # One host sync on a GPU; check_lengths=False skips it.
        low, high = torch.stack(torch.aminmax(lengths)).tolist()
        if low < 0 or high > N:
            raise ValueError(f"{op}: lengths must lie in [0, N] = [0, {N}], got values in [{low}, {high}]")
    return pred, target, lengths


def greedy_match(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1", *,
                 check_lengths: bool = True) -> torch.Tensor:
    """Greedy right-to-left matching; int64 perm [B, N] (see the module docstring)."""
    pred, target, lengths = _validate("greedy_match", pred, target, lengths, metric, check_lengths)
    if _has_kernel("greedy_match", pred.device.type):
        return torch.ops.collat.greedy_match(pred, target, lengths, metric)
    return reference.greedy_match(pred, target, lengths, metric)


def optimal_match(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor, metric: str = "l1", *,
                  check_lengths: bool = True) -> torch.Tensor:
    """Exact minimum-total-distance matching of the valid rows to distinct predicted rows; int64 perm [B, N]."""
    pred, target, lengths = _validate("optimal_match", pred, target, lengths, metric, check_lengths)
    if _has_kernel("optimal_match", pred.device.type):
        return torch.ops.collat.optimal_match(pred, target, lengths, metric)
    return reference.optimal_match(pred, target, lengths, metric)


if _ext.HAS_EXTENSION:

    @torch.library.register_fake("collat::greedy_match")
    def _greedy_match_fake(pred, target, lengths, metric):
        return pred.new_empty(pred.shape[:2], dtype=torch.int64)

    @torch.library.register_fake("collat::optimal_match")
    def _optimal_match_fake(pred, target, lengths, metric):
        return pred.new_empty(pred.shape[:2], dtype=torch.int64)
