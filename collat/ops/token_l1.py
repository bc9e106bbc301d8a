"""token_l1_loss: the matched token L1 loss (L_ct of the paper, and L_ut with the identity perm).

    loss = sum over valid (b, j) of |pred[b, perm[b, j]] - target[b, j]|_1 / (D * #valid)

The front validates its inputs, then runs the Triton kernels (kernels/token_l1.py) on CUDA tensors and,
under TRITON_INTERPRET=1, on CPU tensors; other CPU tensors take the plain-PyTorch reference.
"""
from __future__ import annotations

import torch

from collat.kernels._utils import runs_triton
from collat.kernels.token_l1 import SUPPORTED_DTYPES, TokenL1LossFunction
from collat.ops import reference


def _check_inputs(pred, target, perm) -> None:
    for name, t in (("pred", pred), ("target", target), ("perm", perm)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"token_l1_loss: {name} must be a torch.Tensor, got {type(t).__name__}")
    if pred.dim() != 3:
        raise ValueError(f"token_l1_loss: pred must have shape [B, Np, D] (3 dims), got {tuple(pred.shape)}")
    if target.dim() != 3:
        raise ValueError(f"token_l1_loss: target must have shape [B, Nt, D] (3 dims), got {tuple(target.shape)}")
    B, _, D = pred.shape
    if target.shape[0] != B:
        raise ValueError(f"token_l1_loss: target batch size must equal pred's ({B}), got {target.shape[0]}")
    if target.shape[2] != D:
        raise ValueError(f"token_l1_loss: target width D must equal pred's ({D}), got {target.shape[2]}")
    if D == 0:
        raise ValueError("token_l1_loss: the token width D must be at least 1, got 0")
    if perm.dim() != 2 or perm.shape[0] != B or perm.shape[1] != target.shape[1]:
        raise ValueError(
            f"token_l1_loss: perm must have shape [B, Nt] = {(B, target.shape[1])}, got {tuple(perm.shape)}"
        )
    if perm.dtype != torch.int64:
        raise TypeError(f"token_l1_loss: perm must be torch.int64, got {perm.dtype}")
    if pred.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"token_l1_loss: pred dtype must be one of float32, float16, bfloat16, got {pred.dtype}"
        )
    if target.dtype != pred.dtype:
        raise TypeError(f"token_l1_loss: target dtype must equal pred's ({pred.dtype}), got {target.dtype}")
    if target.device != pred.device or perm.device != pred.device:
        raise ValueError(
            "token_l1_loss: pred, target and perm must be on one device, got "
            f"pred on {pred.device}, target on {target.device}, perm on {perm.device}"
        )


def check_perm(perm: torch.Tensor, num_pred_rows: int) -> None:
    """Raises ValueError unless every perm entry is -1 or in [0, num_pred_rows) and the valid
    entries of each row are distinct (a partial permutation). Synchronises with the device."""
    bad = (perm < -1) | (perm >= num_pred_rows)
    if bool(bad.any()):
        b, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"token_l1_loss: perm[{b}, {j}] must be -1 or in [0, {num_pred_rows}), got {int(perm[b, j])}"
        )
    if perm.shape[1] > 1:
        ordered = perm.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(repeated.any()):
            b, j = (int(v) for v in repeated.nonzero()[0])
            raise ValueError(
                f"token_l1_loss: perm[{b}] must match each predicted row at most once, "
                f"but row {int(ordered[b, j + 1])} is matched more than once"
            )


def token_l1_loss(
    pred: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, *, validate: bool = False
) -> torch.Tensor:
    """Mean absolute difference between target rows and their matched predicted rows.

    pred [B, Np, D], target [B, Nt, D] (float32/float16/bfloat16, one dtype), perm int64 [B, Nt]:
    perm[b, j] is the row of pred[b] matched to target[b, j], -1 when target row j is not valid;
    the valid entries of a row must be distinct. Returns the fp32 scalar
    sum_{valid (b, j)} |pred[b, perm[b, j]] - target[b, j]|_1 / (D * #valid), 0 if nothing is valid.
    Differentiable in pred and target; gradients come in the input dtype.

    validate=True also checks the values of perm (range, distinctness), which synchronises with
    the device; by default out-of-range entries (< 0 or >= Np) are ignored on every backend, and
    repeated ones are undefined.
    CUDA tensors run the Triton kernels, CPU tensors run them in the Triton interpreter when
    TRITON_INTERPRET=1 and otherwise the PyTorch reference.
    """
    _check_inputs(pred, target, perm)
    if validate:
        check_perm(perm, pred.shape[1])
    if not runs_triton(pred.device):
        return reference.token_l1_loss(pred, target, perm)
    grad_on = torch.is_grad_enabled()
    want = (grad_on and pred.requires_grad, grad_on and target.requires_grad)
    if torch.compiler.is_compiling():
        # The triton_op: torch.compile traces into its kernels (and CUDA graphs can capture them).
        return torch.ops.collat.token_l1_fwd(pred, target, perm, *want)[0][0]
    return TokenL1LossFunction.apply(pred, target, perm, *want)
