"""cross_attention: softmax(q k^T / sqrt(d) + key padding mask) v.

The front validates its inputs, then runs the Triton kernels (kernels/attention.py) on CUDA tensors
and, under TRITON_INTERPRET=1, on CPU tensors; other CPU tensors take F.scaled_dot_product_attention
with the padding handled (fast CPU training), all-masked rows still zeros.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from collat.kernels._utils import runs_triton
from collat.kernels.attention import (
    FP32_PRECISIONS,
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    CrossAttentionFunction,
    KVGradients,
    _cross_attention_fwd,
)
from collat.ops import reference


def _sdpa_fallback(q, k, v, key_padding_mask):
    """F.scaled_dot_product_attention with the op's contract: padding keys ignored whatever they hold,
    all-padding rows zeros, a non-finite query row NaN (as the reference gives)."""
    if 0 in q.shape or k.shape[2] == 0:
        return reference.cross_attention(q, k, v, key_padding_mask)  # SDPA dies on some empty shapes (H = 0)
    if key_padding_mask is None:
        out = F.scaled_dot_product_attention(q, k, v)
        # SDPA's CPU kernel turns a NaN/inf query row into zeros; the reference gives NaN.
        return out + 0 * q.sum(dim=-1, keepdim=True)
    all_padding = key_padding_mask.all(dim=1)  # [B]
    padding = key_padding_mask[:, None, :, None]
    # Zeroed padding keys: SDPA masks a score by adding -inf (NaN stays NaN) and multiplies the
    # values by a zero weight (0 * NaN = NaN).
    k, v = k.masked_fill(padding, 0), v.masked_fill(padding, 0)
    # SDPA gives NaN for a row with no visible key: let such rows see every key, then zero them
    # (torch.where also zeroes their gradients).
    attend = ~(key_padding_mask & ~all_padding[:, None])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :])
    return torch.where(all_padding[:, None, None, None], 0, out)


def _check_inputs(q, k, v, key_padding_mask, fp32_precision) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, d], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k must be [B={B}, H={H}, Nk, d={D}] to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim d must be in 1..{MAX_HEAD_DIM}, got d={D}")
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be torch.bool (True = padding), got {key_padding_mask.dtype}")
        expected = (B, k.shape[2])
        if tuple(key_padding_mask.shape) != expected:
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = {expected}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on q's device {q.device}, got {key_padding_mask.device}")


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    fp32_precision: str = "tf32x3",
    kv_gradients: tuple | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v for q [B, H, Nq, d], k and v [B, H, Nk, d].

    key_padding_mask: optional bool [B, Nk], True marks a padding key that is ignored; a query whose
    keys are all padding outputs zeros (zero gradients). fp32/fp16/bf16, output in the input dtype,
    fp32 accumulation. Head dims 1..128.

    fp32_precision (fp32 inputs on the GPU): "tf32x3" (default) splits each fp32 operand into two TF32
    parts and keeps fp32-level accuracy on the tensor cores; "ieee" uses plain fp32 FMAs (exact, slow);
    "tf32" is the fast, ~1e-3-accurate opt-in.

    kv_gradients: optional (KVGradients, slot of k, slot of v): where k and v are head views of
    slots of one projection, the Triton backward writes dk and dv straight into that projection's
    gradient buffer (other backends ignore it; the caller stacks their gradients as usual).
    """
    _check_inputs(q, k, v, key_padding_mask, fp32_precision)
    if key_padding_mask is not None and key_padding_mask.stride(-1) != 1:
        key_padding_mask = key_padding_mask.contiguous()
    if runs_triton(q.device):
        if torch.compiler.is_compiling():
            return _cross_attention_fwd(q, k, v, key_padding_mask, fp32_precision)[0]
        return CrossAttentionFunction.apply(q, k, v, key_padding_mask, fp32_precision, kv_gradients)
    return _sdpa_fallback(q, k, v, key_padding_mask)

__all__ = ["cross_attention", "KVGradients"]
