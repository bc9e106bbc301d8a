"""cross_attention: softmax(q k^T / sqrt(d) + key padding mask) v, flash-style, in Triton.

Layout of this file (Liger style): Triton kernels, host launchers, the custom ops
`collat::cross_attention_fwd` / `collat::cross_attention_bwd` (torch.library.triton_op: torch.compile
traces into the kernels, and CUDA graphs can capture them) with their autograd registration, and an
autograd Function over the same launchers for eager mode (cheaper to dispatch; on CUDA every launch
after the first of a specialization goes straight to the compiled kernel, see _utils.Launcher). Input
validation and the choice of backend live in collat/ops/attention.py.

Shapes: q [B, H, Nq, d], k and v [B, H, Nk, d], any Nq / Nk (the real shape is 77 queries x 1212 audio
keys), head dims 1..128 (padded inside the kernel to a power of two >= 16). Any strides with a unit
last-dim stride are read in place, so the per-head views `t.view(B, L, H, d).transpose(1, 2)` of a
projection's output need no copy; broadcast (stride-0) inputs are read in place too. The output (and
each gradient) has the dimension order of its input with a unit last-dim stride, which makes the usual
merge-heads `transpose(1, 2).reshape(B, Nq, H * d)` free.

Numerics: scores and softmax statistics are fp32; fp16/bf16 inputs feed the tensor cores in their own
dtype (P and dS are rounded to it before their matmuls, as in FlashAttention); fp32 inputs keep
fp32-level accuracy by default through 3xTF32 products (`fp32_precision="tf32x3"`), with "ieee"
(plain fp32 FMAs) and "tf32" (fast, ~1e-3) as explicit choices. A row whose keys are all
padding outputs zeros and gets zero gradients: its log-sum-exp is stored as +inf so that every
probability recomputed in the backward pass is exp(-inf) = 0.

Padding keys are never read (their k and v load as zeros), so whatever they hold, NaN included, cannot
reach an output or a gradient.

Backward, deterministic (no float atomics): for Nq <= 128 (the real shape) ONE kernel per (head, key
split) holds all queries' q, dO and the dq accumulator on chip and walks its keys once, storing dk and
dv per key block (5 matmuls per block). With several splits each stores its dq part in a workspace and
the split of a head that finishes last (a per-head integer ticket, which it zeroes again) sums the
parts in split order inside the same launch. For longer query
sets, and for fp32 tiles too big for shared memory, FlashAttention-2's pair: a dq kernel per query
block (which also stores delta = rowsum(dO * O)) and a dk/dv kernel per key block. A launch config
that does not fit the GPU's shared memory gives way to the next one (remembered per shape class).

With 77 queries a head is one query block, so the grid is B*H programs (256 at B=32, H=8) for the
forward, and B*H*splits for the backward, splits chosen to give every SM two programs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, Launcher, num_sms

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter's tl.dot mis-reads bf16 operands (NumPy has no bf16); there the operands are
    # widened to fp32, which is exact for bf16 values, so the emulation keeps the kernel's rounding.
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


@triton.jit
def _head_dim_mask(HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # A constant all-true mask when d is a power of two: a mask that varies along the contiguous
    # dimension would stop the compiler from vectorising the loads.
    if HEAD_DIM == BLOCK_D:
        valid = tl.full([BLOCK_D], 1, dtype=tl.int1)
    else:
        valid = tl.arange(0, BLOCK_D) < HEAD_DIM
    return valid


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, PAD,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_pad_b,
    H, NQ, NK, NUM_M_BLOCKS,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # One program per (query block, batch*head); the query blocks of one head are neighbours in
    # launch order so that they read that head's K/V while it is still in L2.
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_BLOCKS
    pid_bh = pid // NUM_M_BLOCKS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_base = tl.arange(0, BLOCK_N)
    m_valid = offs_m < NQ
    d_valid = _head_dim_mask(HEAD_DIM, BLOCK_D)

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
        mask=m_valid[:, None] & d_valid[None, :], other=0.0,
    )
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_base = PAD + b * stride_pad_b

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + offs_n_base
        n_valid = offs_n < NK
        keep = n_valid
        if HAS_PAD:
            is_pad = tl.load(pad_base + offs_n, mask=n_valid, other=1)
            keep = keep & (is_pad == 0)
        # Padding keys are not read: whatever they hold (NaN, inf) cannot reach the output.
        kv_mask = keep[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s = tl.where(keep[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row that has seen only masked keys keeps m = -inf; shift it by 0 instead (no inf - inf).
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    empty_row = l_i == 0.0
    out = acc / tl.where(empty_row, 1.0, l_i)[:, None]
    # +inf makes the backward's exp2(s - lse) exactly 0 for rows with no visible key.
    lse = tl.where(empty_row, float("inf"), m_i + tl.log2(tl.where(empty_row, 1.0, l_i)))

    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * NQ + offs_m, lse, mask=m_valid)


@triton.jit
def _attn_bwd_fused_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, PAD, DQ_PARTS, TICKETS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_pad_b,
    H, NQ, NK, NUM_SPLITS, KEYS_PER_SPLIT, NUM_HEADS_TOTAL,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    SPLIT_DQ: tl.constexpr,
):
    # Backward for Nq <= BLOCK_M (all queries of a head in one block, the 77-query case): one program
    # per (batch*head, key split) keeps q, dO and the dq accumulator on chip and walks its keys once,
    # writing each key block's dk and dv as it goes. 5 matmuls per key block instead of FA2's 7, no
    # float atomics: with several splits, each stores its dq part, and the split that finishes last
    # (a per-head integer ticket, which it resets) sums the parts in split order and stores dq.
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    pid_bh = pid // NUM_SPLITS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_base = tl.arange(0, BLOCK_N)
    m_valid = offs_m < NQ
    d_valid = _head_dim_mask(HEAD_DIM, BLOCK_D)
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=md_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=md_mask, other=0.0)
    # delta_i = sum_j P_ij dP_ij = rowsum(dO * O)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    # Rows past NQ load lse = +inf, so their probabilities are exactly 0 and they add nothing to dk/dv.
    lse = tl.load(LSE + pid_bh.to(tl.int64) * NQ + offs_m, mask=m_valid, other=float("inf"))

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    pad_base = PAD + b * stride_pad_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    key_start = split * KEYS_PER_SPLIT
    key_end = tl.minimum(key_start + KEYS_PER_SPLIT, NK)
    for start_n in range(key_start, key_end, BLOCK_N):
        offs_n = start_n + offs_n_base
        n_valid = offs_n < key_end
        nd_mask = n_valid[:, None] & d_valid[None, :]
        keep = n_valid
        if HAS_PAD:
            is_pad = tl.load(pad_base + offs_n, mask=n_valid, other=1)
            keep = keep & (is_pad == 0)
        # Padding keys read as zeros: a NaN there must not reach dq (0 * NaN) or their own zero dk/dv.
        kv_mask = keep[:, None] & d_valid[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        p = tl.where(keep[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv = _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += _dot(ds, k, PRECISION, UPCAST)
        dk = _dot(tl.trans(ds), q, PRECISION, UPCAST) * sm_scale
        tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd_mask)
        tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd_mask)

    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    if SPLIT_DQ:
        part_offsets = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(DQ_PARTS + (split * NUM_HEADS_TOTAL + pid_bh).to(tl.int64) * NQ * HEAD_DIM + part_offsets, dq, mask=md_mask)
        tl.debug_barrier()
        ticket = tl.atomic_add(TICKETS + pid_bh, 1)  # acq_rel: the parts stored before it are visible
        if ticket == NUM_SPLITS - 1:
            total = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            for part in range(0, NUM_SPLITS):
                part_ptrs = DQ_PARTS + (part * NUM_HEADS_TOTAL + pid_bh).to(tl.int64) * NQ * HEAD_DIM + part_offsets
                total += tl.load(part_ptrs, mask=md_mask, other=0.0, cache_modifier=".cg")
            tl.store(dq_ptrs, total.to(DQ.dtype.element_ty), mask=md_mask)
            tl.atomic_xchg(TICKETS + pid_bh, 0)  # zero again for the next launch
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, PAD,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_pad_b,
    H, NQ, NK, NUM_M_BLOCKS,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # FA2 backward, part 1 (any Nq): one program per query block computes and stores delta, then
    # accumulates dq over all key blocks.
    pid = tl.program_id(0)
    pid_m = pid % NUM_M_BLOCKS
    pid_bh = pid // NUM_M_BLOCKS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n_base = tl.arange(0, BLOCK_N)
    m_valid = offs_m < NQ
    d_valid = _head_dim_mask(HEAD_DIM, BLOCK_D)
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :], mask=md_mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=md_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=md_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    row_offset = pid_bh.to(tl.int64) * NQ
    tl.store(DELTA + row_offset + offs_m, delta, mask=m_valid)
    lse = tl.load(LSE + row_offset + offs_m, mask=m_valid, other=float("inf"))

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_base = PAD + b * stride_pad_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + offs_n_base
        n_valid = offs_n < NK
        keep = n_valid
        if HAS_PAD:
            is_pad = tl.load(pad_base + offs_n, mask=n_valid, other=1)
            keep = keep & (is_pad == 0)
        kv_mask = keep[:, None] & d_valid[None, :]  # padding keys read as zeros (see the fused kernel)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        p = tl.where(keep[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=md_mask,
    )


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, PAD,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_pad_b,
    H, NQ, NK, NUM_N_BLOCKS,
    qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # FA2 backward, part 2 (any Nq): one program per key block loops over the query blocks; works in
    # the transposed orientation (keys on rows) so that dk and dv come out without transposes.
    pid = tl.program_id(0)
    pid_n = pid % NUM_N_BLOCKS
    pid_bh = pid // NUM_N_BLOCKS
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m_base = tl.arange(0, BLOCK_M)
    n_valid = offs_n < NK
    d_valid = _head_dim_mask(HEAD_DIM, BLOCK_D)
    nd_mask = n_valid[:, None] & d_valid[None, :]

    keep = n_valid
    if HAS_PAD:
        is_pad = tl.load(PAD + b * stride_pad_b + offs_n, mask=n_valid, other=1)
        keep = keep & (is_pad == 0)
    kv_mask = keep[:, None] & d_valid[None, :]  # padding keys read as zeros (see the fused kernel)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_offset = pid_bh.to(tl.int64) * NQ
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    for start_m in range(0, NQ, BLOCK_M):
        offs_m = start_m + offs_m_base
        m_valid = offs_m < NQ
        md_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], mask=md_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], mask=md_mask, other=0.0)
        lse = tl.load(LSE + row_offset + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + row_offset + offs_m, mask=m_valid, other=0.0)

        st = _dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
        pt = tl.where(keep[:, None], tl.exp2(st - lse[None, :]), 0.0)
        dv += _dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dpt = _dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, PRECISION, UPCAST)

    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :],
        dk.to(DK.dtype.element_ty), mask=nd_mask,
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty), mask=nd_mask,
    )


# ----------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchConfig:
    """A launch config; the launchers take an explicit one (benchmark sweeps, tests) or use the defaults
    of forward_config / backward_config."""

    block_n: int
    num_warps: int
    num_stages: int
    block_m: int | None = None  # split backward path only; fused paths use one block over Nq
    num_splits: int | None = None  # fused backward only


FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")
FUSED_BACKWARD_MAX_NQ = 128  # up to this many queries the backward runs as one kernel per head
INTERPRETER_CONFIG = LaunchConfig(block_n=64, num_warps=4, num_stages=1)


def forward_config(q: torch.Tensor) -> LaunchConfig:
    """Forward launch config (one query block of up to 128 rows x BLOCK_N keys per step). bf16: the
    best of the one sweep run so far (B=32 H=8 q77 k1212 d64, H200, an earlier revision of the kernel;
    `benchmarks/bench_attention.py --sweep` repeats it); fp32 (3xTF32): not swept yet."""
    if INTERPRET:
        return INTERPRETER_CONFIG
    wide = _block_m(q.shape[2]) * _block_d(q.shape[-1]) >= 128 * 64
    if q.dtype == torch.float32:
        return LaunchConfig(block_n=32 if _block_d(q.shape[-1]) > 64 else 64, num_warps=8 if wide else 4, num_stages=2)
    return LaunchConfig(block_n=64, num_warps=8 if wide else 4, num_stages=3)


def backward_configs(q: torch.Tensor) -> list[LaunchConfig]:
    """Fused-backward launch configs, best first; a config that needs more shared memory than the GPU
    has (fp32 operands with all 128 query rows on chip) gives way to the next, and past the last one
    the backward takes FA2's split kernels."""
    if INTERPRET:
        return [INTERPRETER_CONFIG]
    wide = _block_m(q.shape[2]) * _block_d(q.shape[-1]) >= 128 * 64
    warps = 8 if wide else 4
    if q.dtype == torch.float32:
        # Measured on an H200: fp32 q/dO tiles of 128 x 64 need ~300 KB of shared memory even at
        # BLOCK_N=16, one stage (the limit is 227 KB), so such shapes go straight to the split kernels.
        return [] if wide else [LaunchConfig(32, warps, 2), LaunchConfig(16, warps, 1)]
    if _block_d(q.shape[-1]) > 64:
        return [LaunchConfig(32, warps, 2), LaunchConfig(16, warps, 1), LaunchConfig(16, 4, 1)]
    return [LaunchConfig(64, warps, 2), LaunchConfig(32, warps, 1)]


def backward_config(q: torch.Tensor) -> LaunchConfig | None:
    """The first fused-backward config tried (None: the split kernels)."""
    configs = backward_configs(q)
    return configs[0] if configs else None


# (dtype, Nq block, d block, precision) -> index into backward_configs, or None = use the split path;
# filled the first time a combination runs out of shared memory.
_BACKWARD_FALLBACK: dict = {}


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _block_d(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))


def _block_m(num_queries: int, cap: int = 128) -> int:
    # The 77 queries of the real shape fit one 128-row block, so each head's K/V stream is read once.
    return max(16, min(cap, _next_pow2(num_queries)))


def _precision(dtype: torch.dtype, fp32_precision: str) -> str:
    return fp32_precision if dtype == torch.float32 else "tf32"  # the latter is ignored for fp16/bf16


def _upcast_dots(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return int(t.stride(0)), int(t.stride(1)), int(t.stride(2))  # int(): static under torch.compile


def _pad_arg(key_padding_mask: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    if key_padding_mask is None:
        return like, 0  # never read: HAS_PAD is False
    pad = key_padding_mask.view(torch.uint8)  # bool -> bytes without a copy
    return pad, int(pad.stride(0))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_in_layout_of(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, view): a dense buffer and its view with t's shape, dimension order and a unit last-dim
    stride (the kernels' contract). For a head view of a wider buffer (k sliced out of a fused K/V
    projection) this is [B, N, H, d] memory, which the gradient's consumer reads in order. Broadcast
    (stride-0) and size-1 dimensions carry no order, so they go outermost. The kernels write through
    the buffer (with the view's strides): under torch.compile a kernel's writes must land on a base
    tensor, not on a view of one."""
    if t.is_contiguous():
        dense = torch.empty_like(t, memory_format=torch.contiguous_format)
        return dense, dense
    last = t.dim() - 1

    def outer_first(i):
        free = t.stride(i) == 0 or t.shape[i] == 1
        return (0 if free else 1, -t.stride(i), i)

    order = sorted(range(last), key=outer_first) + [last]
    dense = torch.empty([t.shape[i] for i in order], device=t.device, dtype=t.dtype)
    return dense, dense.permute([order.index(i) for i in range(t.dim())])


_forward = Launcher(_attn_fwd_kernel, writes=("O", "LSE"))
_bwd_fused = Launcher(_attn_bwd_fused_kernel, writes=("DQ", "DK", "DV", "DQ_PARTS", "TICKETS"))
_bwd_dq = Launcher(_attn_bwd_dq_kernel, writes=("DQ", "DELTA"))
_bwd_dkdv = Launcher(_attn_bwd_dkdv_kernel, writes=("DK", "DV"))

# (device type, index, stream) -> (fp32 dq parts, int32 per-head tickets, zero between launches): the
# fused backward's workspace, reused by every call on that stream (kernels on one stream never overlap).
_WORKSPACES: dict = {}


def _dq_workspace(device: torch.device, parts: int, heads: int, traced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if traced:  # torch.compile plans the buffers; the tickets start at zero
        return torch.empty(parts, device=device, dtype=torch.float32), torch.zeros(heads, device=device, dtype=torch.int32)
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None
    key = (device.type, device.index, stream)
    cached = _WORKSPACES.get(key)
    if cached is None or cached[0].numel() < parts or cached[1].numel() < heads:
        old_parts, old_heads = (cached[0].numel(), cached[1].numel()) if cached else (0, 0)
        cached = _WORKSPACES[key] = (
            torch.empty(max(parts, 2 * old_parts), device=device, dtype=torch.float32),
            torch.zeros(max(heads, 2 * old_heads), device=device, dtype=torch.int32),
        )
    return cached


def _constexprs(q, key_padding_mask, fp32_precision, block_m, block_n) -> dict:
    """The compile-time parameters every kernel here takes, in their order in the signatures."""
    D = int(q.shape[-1])
    return dict(
        HEAD_DIM=D, HAS_PAD=key_padding_mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(D),
        PRECISION=_precision(q.dtype, fp32_precision), UPCAST=_upcast_dots(q),
    )


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    fp32_precision: str = "tf32x3",
    config: LaunchConfig | None = None,
    traced: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out in q's dimension order, lse fp32 [B, H, Nq] in log2 units of the scaled scores).
    q, k, v need a unit last-dim stride (any other strides, stride 0 included, are read in place)."""
    B, H, NQ, D = map(int, q.shape)  # int(): under torch.compile, block sizes need static shapes
    NK = int(k.shape[2])
    out_buffer, out = _empty_in_layout_of(q)
    lse = torch.empty((B, H, NQ), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    block_m = _block_m(NQ)
    num_m_blocks = triton.cdiv(NQ, block_m)
    pad, stride_pad = _pad_arg(key_padding_mask, q)
    sm_scale = 1.0 / math.sqrt(D)
    config = config or forward_config(q)
    _forward(
        (num_m_blocks * B * H,),
        (q, k, v, out_buffer, lse, pad, *_strides(q), *_strides(k), *_strides(v), *_strides(out), stride_pad,
         H, NQ, NK, num_m_blocks, sm_scale * LOG2E),
        _constexprs(q, key_padding_mask, fp32_precision, block_m, config.block_n),
        traced, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def _num_splits(q: torch.Tensor, NK: int) -> int:
    """Key splits for the fused backward: enough programs for two per SM, each keeping >= 256 keys."""
    if q.device.type != "cuda":
        return 1
    programs = q.shape[0] * q.shape[1]
    return max(1, min(triton.cdiv(2 * num_sms(q.device.index), programs), NK // 256, 8))


def _launch_fused_backward(grad_out, q, k, v, out, lse, key_padding_mask, buffers, grads, fp32_precision, config, traced):
    B, H, NQ, D = map(int, q.shape)  # int(): under torch.compile, block sizes need static shapes
    NK = int(k.shape[2])
    num_splits = config.num_splits or _num_splits(q, NK)
    # Splits own whole multiples of 128 keys, so every BLOCK_N (<= 128) tiles them exactly.
    keys_per_split = triton.cdiv(triton.cdiv(NK, num_splits), 128) * 128
    num_splits = triton.cdiv(NK, keys_per_split)
    if num_splits > 1:
        dq_parts, tickets = _dq_workspace(q.device, num_splits * B * H * NQ * D, B * H, traced)
    else:
        dq_parts = tickets = lse  # never touched: SPLIT_DQ is False
    pad, stride_pad = _pad_arg(key_padding_mask, q)
    sm_scale = 1.0 / math.sqrt(D)
    constexprs = _constexprs(q, key_padding_mask, fp32_precision, _block_m(NQ), config.block_n)
    args = (
        q, k, v, out, grad_out, *buffers, lse, pad, dq_parts, tickets,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out),
        *(stride for grad in grads for stride in _strides(grad)), stride_pad,
        H, NQ, NK, num_splits, keys_per_split, B * H, sm_scale * LOG2E, sm_scale,
    )
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    try:
        _bwd_fused((B * H * num_splits,), args, dict(**constexprs, SPLIT_DQ=num_splits > 1), traced, **launch)
    except BaseException:
        if num_splits > 1 and not traced:
            # Only the interpreter can stop inside a launch (Ctrl-C between programs): the tickets the
            # stopped programs counted up would wait for the next call. (Nothing ran on an OutOfResources.)
            tickets.zero_()
        raise


def _launch_split_backward(grad_out, q, k, v, out, lse, key_padding_mask, buffers, grads, fp32_precision, config, traced):
    B, H, NQ, D = map(int, q.shape)  # int(): under torch.compile, block sizes need static shapes
    NK = int(k.shape[2])
    delta = torch.empty_like(lse)
    fp32 = q.dtype == torch.float32
    block_m = (config.block_m if config and config.block_m else None) or _block_m(NQ, 32 if fp32 else 64)
    block_n = config.block_n if config else (32 if fp32 else 64)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages) if config else dict(num_warps=4, num_stages=2)
    pad, stride_pad = _pad_arg(key_padding_mask, q)
    sm_scale = 1.0 / math.sqrt(D)
    constexprs = _constexprs(q, key_padding_mask, fp32_precision, block_m, block_n)
    num_m_blocks = triton.cdiv(NQ, block_m)
    _bwd_dq(
        (num_m_blocks * B * H,),
        (q, k, v, out, grad_out, buffers[0], lse, delta, pad,
         *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(grad_out), *_strides(grads[0]), stride_pad,
         H, NQ, NK, num_m_blocks, sm_scale * LOG2E, sm_scale),
        constexprs, traced, **launch,
    )
    num_n_blocks = triton.cdiv(NK, block_n)
    _bwd_dkdv(
        (num_n_blocks * B * H,),
        (q, k, v, grad_out, buffers[1], buffers[2], lse, delta, pad,
         *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(grads[1]), *_strides(grads[2]), stride_pad,
         H, NQ, NK, num_n_blocks, sm_scale * LOG2E, sm_scale),
        constexprs, traced, **launch,
    )


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    fp32_precision: str = "tf32x3",
    config: LaunchConfig | None = None,
    mode: str = "auto",
    traced: bool = False,
    kv_grads: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv. mode: "fused" (one kernel per head; needs Nq <= 128), "split" (FA2's dq kernel +
    dk/dv kernel, any Nq) or "auto" (fused where it applies). kv_grads: where to write dk and dv
    (tensors of k's shape with a unit last-dim stride, e.g. slots of one buffer for several calls)."""
    B, H, NQ, D = map(int, q.shape)  # int(): under torch.compile, block sizes need static shapes
    NK = int(k.shape[2])
    grad_out = _unit_last_stride(grad_out)
    buffers, (dq, dk, dv) = zip(*(_empty_in_layout_of(t) for t in (q, k, v)))
    if kv_grads is not None:
        dk, dv = kv_grads
        buffers, (dq, dk, dv) = (buffers[0], dk, dv), (dq, dk, dv)
    if B * H == 0:
        return dq, dk, dv
    if NQ == 0 or NK == 0:  # nothing attends: every gradient is zero
        for grad in (dq, dk, dv):
            grad.zero_()
        return dq, dk, dv
    if mode == "auto":
        mode = "fused" if NQ <= FUSED_BACKWARD_MAX_NQ else "split"
    if mode == "fused" and NQ > FUSED_BACKWARD_MAX_NQ:
        raise ValueError(f"the fused backward needs Nq <= {FUSED_BACKWARD_MAX_NQ}, got Nq={NQ}")
    args = (grad_out, q, k, v, out, lse, key_padding_mask, buffers, (dq, dk, dv), fp32_precision)
    if mode == "fused":
        if config is not None:
            _launch_fused_backward(*args, config, traced)
            return dq, dk, dv
        fallback_key = (q.dtype, _block_m(NQ), _block_d(D), fp32_precision, q.device)
        candidates = backward_configs(q)
        start = _BACKWARD_FALLBACK.get(fallback_key, 0)
        if traced:  # compiled later by Inductor, where nothing can fall back: the decision made so far
            if start is not None and start < len(candidates):
                _launch_fused_backward(*args, candidates[start], traced)
                return dq, dk, dv
        else:
            for index in range(start, len(candidates)) if start is not None else ():
                try:
                    _launch_fused_backward(*args, candidates[index], traced)
                except triton.runtime.errors.OutOfResources:  # raised before the launch: nothing written
                    _BACKWARD_FALLBACK[fallback_key] = index + 1
                    continue
                _BACKWARD_FALLBACK[fallback_key] = index
                return dq, dk, dv
            _BACKWARD_FALLBACK[fallback_key] = None
        # No fused config fits (fp32 with 128 query rows on chip): FA2's split kernels below.
    _launch_split_backward(*args, config, traced)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op: torch.compile traces into the kernels) + autograd
# ----------------------------------------------------------------------------------------------


@torch.library.triton_op("collat::cross_attention_fwd", mutates_args=())
def _cross_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor], fp32_precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return attention_forward(q, k, v, key_padding_mask, fp32_precision, traced=True)


@torch.library.triton_op("collat::cross_attention_bwd", mutates_args=())
def _cross_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor],
    fp32_precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return attention_backward(grad_out, q, k, v, out, lse, key_padding_mask, fp32_precision, traced=True)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, fp32_precision = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
    ctx.fp32_precision = fp32_precision
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = _cross_attention_bwd(grad_out, q, k, v, out, lse, key_padding_mask, ctx.fp32_precision)
    return dq, dk, dv, None, None


_cross_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class KVGradients:
    """One gradient buffer [B, M, slots, D] for the K and V of several cross_attention calls whose k
    and v are head views of slots of one projection [B, M, slots, D] (TokenInteraction's fused K/V):
    each call's backward writes its dk and dv straight into their slots (`slot`), so the projection
    receives one gradient without a stack of 2 * depth tensors. Allocated at the first backward."""

    def __init__(self, projection: torch.Tensor):
        self.shape, self.dtype, self.device = projection.shape, projection.dtype, projection.device
        self.buffer: torch.Tensor | None = None

    def slot(self, index: int, num_heads: int) -> torch.Tensor:
        """Slot `index` as the gradient of a head view [B, H, M, D / H]."""
        if self.buffer is None:
            self.buffer = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        B, M, _, D = self.shape
        return self.buffer[:, :, index].view(B, M, num_heads, D // num_heads).transpose(1, 2)

    def holds(self, index: int, grad: torch.Tensor | None) -> bool:
        """Whether `grad` (the gradient of slot `index`, [B, M, D]) is that slot of the buffer itself."""
        if grad is None or self.buffer is None:
            return False
        own = self.buffer[:, :, index]
        return grad.data_ptr() == own.data_ptr() and grad.shape == own.shape and grad.stride() == own.stride()


class CrossAttentionFunction(torch.autograd.Function):
    """The eager path: the same launchers without the custom-op dispatch, which costs several times
    more host time per call than the kernels take on the GPU at the real shape."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, fp32_precision, kv_gradients=None):
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        out, lse = attention_forward(q, k, v, key_padding_mask, fp32_precision)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.fp32_precision = fp32_precision
        ctx.kv_gradients = kv_gradients  # (KVGradients, slot of k, slot of v) or None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        kv_grads = None
        if ctx.kv_gradients is not None:
            gradients, k_slot, v_slot = ctx.kv_gradients
            destinations = (gradients.slot(k_slot, k.shape[1]), gradients.slot(v_slot, v.shape[1]))
            if all(d.shape == t.shape and d.dtype == t.dtype for d, t in zip(destinations, (k, v))):
                kv_grads = destinations
        dq, dk, dv = attention_backward(
            grad_out, q, k, v, out, lse, key_padding_mask, ctx.fp32_precision, kv_grads=kv_grads
        )
        return dq, dk, dv, None, None, None
