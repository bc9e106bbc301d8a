"""token_l1_loss: the matched token L1 loss (L_ct of docs/design.md §2, also L_ut) as Triton kernels.

    loss = sum over valid (b, j) of |pred[b, perm[b, j]] - target[b, j]|_1 / (D * #valid)

perm[b, j] is the predicted row matched to target row j (-1: not valid). The loss is an fp32 scalar
(0 when nothing is valid); gradients go to pred (scattered to the matched rows, exactly 0 on the
others) and to target when it requires grad.

Why the gradient is written by the forward kernel. At the real shape (B=256, N=77, D=512) the op is
pure memory traffic. Recomputing |diff| in a separate backward costs read pred + target twice and
write grad_pred once (5 passes over a [B, N, D] tensor). The gradient of an L1 loss is
sign(diff) / (D * #valid) times the incoming scalar, so the forward kernel, which has diff in
registers anyway, writes sign(diff) * 1/(D * #valid) straight into the gradient buffers (3 passes).
The backward kernel then only has to apply the incoming gradient g: it reads g on the device and
returns at once when g == 1 (loss.backward() on this loss alone) without touching memory; for any
other g it rewrites the buffers as sign(stored) * g/(D * #valid), which rounds once, exactly like
the recomputed gradient would. fp16 cannot hold 1/(D * #valid) for large batches (it underflows
below 6e-8), so for fp16 the forward stores the bare sign and the backward always scales.
Everything is computed only when a gradient is wanted (grad mode on and an input requiring grad);
under torch.no_grad the forward only reads.

Launches: the forward needs #valid before it writes any gradient, so a prepare kernel, one program
per batch item and O(Np + Nt), first counts the item's valid perm entries and flags which predicted
rows are matched (a scatter; the others get an exact-zero gradient). The forward kernel runs a grid
of up to a few programs per SM; each sums the per-item counts (B numbers) for the scale, then walks
tiles of BLOCK_R rows of one batch item x D. Per-tile partial sums go to a workspace; the program
that finishes last (an integer ticket) sums them in a fixed order. The ticket is zeroed by the
prepare kernel of the same call, so a call interrupted half-way (Ctrl-C in the interpreter) cannot
leave a count that a later call inherits, and a CUDA-graph replay starts from zero too. No float
atomics, and the result does not depend on the grid size: bit-identical run to run. The workspace
is reused across calls on a stream; the loss and 1/(D * #valid), which the backward needs, live in
a small per-call buffer. The backward is one launch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._utils import Launcher, num_sms, on_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Workspace layout (fp32): [per-item valid counts (B), matched flags of the predicted rows (B * Np, with
# a gradient to pred), tile sums (one per tile)].


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _prepare_kernel(
    perm_ptr,  # int64 [B, Nt], contiguous
    work_ptr,  # fp32 workspace, layout above
    counter_ptr,  # int32 ticket of the forward kernel
    flags_offset,
    Np,
    Nt,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    WRITE_FLAGS: tl.constexpr,
):
    """One program per batch item, O(Np + Nt): the item's number of valid perm entries and, with
    WRITE_FLAGS, 1.0/0.0 per predicted row for matched/unmatched (zeros, then a scatter of ones).
    Program 0 also zeroes the forward kernel's ticket: every call starts from 0, whatever an
    interrupted earlier call left there."""
    b = tl.program_id(0)
    if b == 0:
        tl.store(counter_ptr, 0)
    perm_row_ptr = perm_ptr + b.to(tl.int64) * Nt
    flags_row_ptr = work_ptr + flags_offset + b.to(tl.int64) * Np
    if WRITE_FLAGS:
        for i0 in range(0, Np, BLOCK_I):
            rows = i0 + tl.arange(0, BLOCK_I)
            tl.store(flags_row_ptr + rows, tl.zeros([BLOCK_I], dtype=tl.float32), mask=rows < Np)
        tl.debug_barrier()  # the zeros land before the ones below
    count_lanes = tl.zeros([BLOCK_J], dtype=tl.int32)
    for j0 in range(0, Nt, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        p = tl.load(perm_row_ptr + js, mask=js < Nt, other=-1)
        valid = (p >= 0) & (p < Np)
        count_lanes += valid.to(tl.int32)
        if WRITE_FLAGS:
            tl.store(flags_row_ptr + p, tl.full([BLOCK_J], 1.0, dtype=tl.float32), mask=valid)
    tl.store(work_ptr + b, tl.sum(count_lanes, axis=0).to(tl.float32))  # <= Nt: exact


@triton.jit
def _token_l1_fwd_kernel(
    pred_ptr,
    target_ptr,
    perm_ptr,  # int64 [B, Nt], contiguous
    grad_pred_ptr,  # [B, Np, D] contiguous, input dtype (unused unless WRITE_GRAD_PRED)
    grad_target_ptr,  # [B, Nt, D] contiguous, input dtype (unused unless WRITE_GRAD_TARGET)
    work_ptr,  # fp32 workspace, layout above
    loss_ptr,  # fp32 [2]: the loss, then 1/(D * #valid) for the backward
    counter_ptr,  # int32 ticket, zeroed by _prepare_kernel
    B,
    Np,
    Nt,
    D,
    flags_offset,  # matched flags of the predicted rows, written by _prepare_kernel
    tiles_offset,
    stride_pb,
    stride_pn,
    stride_pd,
    stride_tb,
    stride_tn,
    stride_td,
    num_tiles,
    tiles_per_item,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_FINAL: tl.constexpr,
    WRITE_GRAD_PRED: tl.constexpr,
    WRITE_GRAD_TARGET: tl.constexpr,
    PRESCALE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    WRITE_GRAD: tl.constexpr = WRITE_GRAD_PRED or WRITE_GRAD_TARGET

    # #valid of the whole batch, summed by every program from the per-item counts (B floats, exact
    # integers, a fixed order): the gradient scale is known before any gradient is written.
    valid_lanes = tl.zeros([BLOCK_B], dtype=tl.int32)
    for first in range(0, B, BLOCK_B):
        items = first + tl.arange(0, BLOCK_B)
        valid_lanes += tl.load(work_ptr + items, mask=items < B, other=0.0).to(tl.int32)
    denominator = tl.maximum(tl.sum(valid_lanes, axis=0), 1).to(tl.float32) * D
    if WRITE_GRAD:
        if PRESCALE_GRAD:
            grad_scale = 1.0 / denominator
        else:
            grad_scale = denominator * 0.0 + 1.0

    tile_sums_ptr = work_ptr + tiles_offset
    row_lanes = tl.arange(0, BLOCK_R)
    col_lanes = tl.arange(0, BLOCK_D)
    for tile in range(pid, num_tiles, num_programs):
        b = (tile // tiles_per_item).to(tl.int64)
        rows = (tile % tiles_per_item) * BLOCK_R + row_lanes
        is_target_row = rows < Nt
        perm_row_ptr = perm_ptr + b * Nt
        src = tl.load(perm_row_ptr + rows, mask=is_target_row, other=-1)
        # Out-of-range entries are treated as invalid so that a bad perm cannot fault
        # (validate=True reports them instead).
        valid = (src >= 0) & (src < Np)
        src = tl.where(valid, src, 0)
        pred_rows_ptr = pred_ptr + b * stride_pb + src * stride_pn
        target_rows_ptr = target_ptr + b * stride_tb + rows.to(tl.int64) * stride_tn

        if WRITE_GRAD_PRED:
            # Predicted rows of this tile that no target row points to get a zero gradient.
            matched = tl.load(work_ptr + flags_offset + b * Np + rows, mask=rows < Np, other=1.0)
            unmatched = (rows < Np) & (matched == 0.0)
            grad_pred_item_ptr = grad_pred_ptr + b * Np * D
        if WRITE_GRAD_TARGET:
            grad_target_rows_ptr = grad_target_ptr + (b * Nt + rows) * D

        abs_sums = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + col_lanes
            col_ok = cols < D
            load_mask = valid[:, None] & col_ok[None, :]
            x = tl.load(pred_rows_ptr[:, None] + cols[None, :] * stride_pd, mask=load_mask, other=0.0)
            y = tl.load(target_rows_ptr[:, None] + cols[None, :] * stride_td, mask=load_mask, other=0.0)
            diff = x.to(tl.float32) - y.to(tl.float32)
            abs_sums += tl.abs(diff)
            if WRITE_GRAD:
                # sign(diff) * scale, 0 where diff is 0 or NaN: torch's abs backward does the same.
                grad = tl.where(diff > 0, grad_scale, tl.where(diff < 0, -grad_scale, 0.0))
            if WRITE_GRAD_PRED:
                tl.store(
                    grad_pred_item_ptr + src[:, None] * D + cols[None, :],
                    grad.to(grad_pred_ptr.dtype.element_ty),
                    mask=load_mask,
                )
                tl.store(
                    grad_pred_item_ptr + rows[:, None].to(tl.int64) * D + cols[None, :],
                    tl.zeros([BLOCK_R, BLOCK_D], dtype=grad_pred_ptr.dtype.element_ty),
                    mask=unmatched[:, None] & col_ok[None, :],
                )
            if WRITE_GRAD_TARGET:
                tl.store(
                    grad_target_rows_ptr[:, None] + cols[None, :],
                    tl.where(valid[:, None], -grad, 0.0).to(grad_target_ptr.dtype.element_ty),
                    mask=is_target_row[:, None] & col_ok[None, :],
                )
        tl.store(tile_sums_ptr + tile, tl.sum(abs_sums))

    # The last program to finish reduces the per-tile partials in a fixed order.
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1)  # acq_rel: the partials stored above are visible
    if ticket == num_programs - 1:
        total_lanes = tl.zeros([BLOCK_FINAL], dtype=tl.float32)
        for first in range(0, num_tiles, BLOCK_FINAL):
            tile_ids = first + tl.arange(0, BLOCK_FINAL)
            total_lanes += tl.load(tile_sums_ptr + tile_ids, mask=tile_ids < num_tiles, other=0.0, cache_modifier=".cg")
        tl.store(loss_ptr, tl.sum(total_lanes, axis=0) / denominator)
        tl.store(loss_ptr + 1, 1.0 / denominator)


@triton.jit
def _token_l1_bwd_kernel(
    grad_loss_ptr,  # fp32 scalar: d(out)/d(loss)
    loss_ptr,  # fp32 [2] from the forward: [loss, 1/(D * #valid)]
    grad_a_ptr,
    numel_a,
    grad_b_ptr,
    numel_b,
    blocks_a,
    num_blocks,
    BLOCK: tl.constexpr,
    PRESCALED: tl.constexpr,
):
    # The buffers hold sign(diff) * stored_scale; the wanted gradient is sign(diff) * g / (D * #valid).
    inv_denominator = tl.load(loss_ptr + 1)
    factor = tl.load(grad_loss_ptr).to(tl.float32) * inv_denominator
    if PRESCALED:
        stored_scale = inv_denominator
    else:
        stored_scale = inv_denominator * 0.0 + 1.0
    if factor != stored_scale:
        lanes = tl.arange(0, BLOCK)
        for block in range(tl.program_id(0), num_blocks, tl.num_programs(0)):
            if block < blocks_a:
                offs = tl.cast(block, tl.int64) * BLOCK + lanes
                mask = offs < numel_a
                v = tl.load(grad_a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(v > 0, factor, tl.where(v < 0, -factor, 0.0))
                tl.store(grad_a_ptr + offs, v.to(grad_a_ptr.dtype.element_ty), mask=mask)
            else:
                offs = tl.cast(block - blocks_a, tl.int64) * BLOCK + lanes
                mask = offs < numel_b
                v = tl.load(grad_b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                v = tl.where(v > 0, factor, tl.where(v < 0, -factor, 0.0))
                tl.store(grad_b_ptr + offs, v.to(grad_b_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridPolicy:
    """How the launchers size tiles and grids (per backend)."""

    tile_bytes: int  # bytes of one [BLOCK_R, BLOCK_D] tile of one input
    max_block_d: int
    programs_per_sm: int  # forward grid = min(tiles, SMs * programs_per_sm) (CUDA)
    num_warps: int
    cpu_programs: int  # forward grid in the interpreter: small, but > 1 to exercise the ticket
    bwd_programs_per_sm: int  # backward grid = min(blocks, SMs * bwd_programs_per_sm) (CUDA)


# CUDA: the best of a sweep on an H200 (benchmarks/bench_l1.py --sweep; 8 KiB tiles with 8 programs
# per SM led for bf16 and were within noise of the best for fp32). On CPU (the interpreter) the
# blocks are small so that tests cover several tiles, several D blocks and several programs.
CUDA_CONFIG = GridPolicy(
    tile_bytes=8192, max_block_d=1024, programs_per_sm=8, num_warps=8, cpu_programs=0, bwd_programs_per_sm=8
)
CPU_CONFIG = GridPolicy(
    tile_bytes=8192, max_block_d=64, programs_per_sm=0, num_warps=4, cpu_programs=3, bwd_programs_per_sm=0
)
BWD_BLOCK = 4096
BWD_NUM_WARPS = 8

_prepare = Launcher(_prepare_kernel, writes=("work_ptr", "counter_ptr"))
_forward = Launcher(_token_l1_fwd_kernel, writes=("grad_pred_ptr", "grad_target_ptr", "work_ptr", "loss_ptr", "counter_ptr"))
_backward = Launcher(_token_l1_bwd_kernel, writes=("grad_a_ptr", "grad_b_ptr"))

# (device type, index, stream) -> (fp32 workspace, int32 ticket): reused by every call on that stream.
# Kernels on one stream never overlap, and nothing in the workspace outlives the forward call.
_WORKSPACES: dict = {}


def _new_buffer(shape, dtype, device) -> torch.Tensor:
    """Every buffer the launchers fill (tests replace this to poison them with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _workspace(device: torch.device, numel: int, traced: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace (at least `numel` fp32) and the ticket of the forward kernel. Traced calls
    (torch.compile) get fresh buffers, which the compiler plans; eager calls reuse one per stream."""
    if traced:
        return _new_buffer((numel,), torch.float32, device), _new_buffer((1,), torch.int32, device)
    stream = torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else None
    key = (device.type, device.index, stream)
    cached = _WORKSPACES.get(key)
    if cached is None or cached[0].numel() < numel:
        size = max(numel, 2 * cached[0].numel()) if cached is not None else numel
        cached = _WORKSPACES[key] = (_new_buffer((size,), torch.float32, device), _new_buffer((1,), torch.int32, device))
    return cached


def _launch_forward(pred, target, perm, want_grad_pred: bool, want_grad_target: bool, traced: bool = False):
    """Runs the prepare and forward kernels. Returns (loss_and_scale fp32 [2], grad_pred or None,
    grad_target or None): the loss, 1/(D * #valid), and gradient buffers holding
    sign(diff) * stored scale until the backward kernel runs."""
    B, Np, D = map(int, pred.shape)  # int(): under torch.compile, block sizes need static shapes
    Nt = int(target.shape[1])
    device = pred.device
    on_cuda = device.type == "cuda"
    cfg = CUDA_CONFIG if on_cuda else CPU_CONFIG

    block_d = min(triton.next_power_of_2(D), cfg.max_block_d)
    max_rows = max(Np, Nt)
    block_r = max(1, min(cfg.tile_bytes // (pred.element_size() * block_d), triton.next_power_of_2(max_rows)))
    tiles_per_item = triton.cdiv(max_rows, block_r)
    num_tiles = B * tiles_per_item
    grid = min(num_tiles, num_sms(device.index) * cfg.programs_per_sm if on_cuda else cfg.cpu_programs)
    flags_offset = B
    tiles_offset = flags_offset + (B * Np if want_grad_pred else 0)

    loss = _new_buffer((2,), torch.float32, device)
    work, counter = _workspace(device, tiles_offset + num_tiles, traced)
    grad_pred = _new_buffer(pred.shape, pred.dtype, device) if want_grad_pred else None
    grad_target = _new_buffer(target.shape, target.dtype, device) if want_grad_target else None
    perm = perm if perm.is_contiguous() else perm.contiguous()
    _prepare(
        (B,),
        (perm, work, counter, flags_offset, Np, Nt),
        dict(BLOCK_I=min(triton.next_power_of_2(max(Np, 1)), 128), BLOCK_J=min(triton.next_power_of_2(Nt), 128),
             WRITE_FLAGS=want_grad_pred),
        traced, num_warps=4,
    )
    _forward(
        (grid,),
        (pred, target, perm, grad_pred if want_grad_pred else work, grad_target if want_grad_target else work,
         work, loss, counter, B, Np, Nt, D, flags_offset, tiles_offset, *map(int, pred.stride()), *map(int, target.stride()),
         num_tiles, tiles_per_item),
        dict(BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_B=min(triton.next_power_of_2(B), 1024),
             BLOCK_FINAL=min(triton.next_power_of_2(num_tiles), 1024), WRITE_GRAD_PRED=want_grad_pred,
             WRITE_GRAD_TARGET=want_grad_target, PRESCALE_GRAD=prescaled(pred.dtype)),
        traced, num_warps=cfg.num_warps,
    )
    return loss, grad_pred, grad_target


def prescaled(dtype: torch.dtype) -> bool:
    """Whether the forward stores sign(diff) / (D * #valid) (True) or the bare sign (fp16, which
    cannot hold 1/(D * #valid) for large batches)."""
    return dtype != torch.float16


def _launch_backward(grad_loss, loss, grad_pred, grad_target, traced: bool = False) -> None:
    """Turns the buffers from the forward into the gradients for grad_loss, in place."""
    buffers = [g for g in (grad_pred, grad_target) if g is not None and g.numel() > 0]
    if not buffers:
        return
    a = buffers[0]
    b = buffers[1] if len(buffers) > 1 else a
    numel_a = int(a.numel())
    numel_b = int(b.numel()) if len(buffers) > 1 else 0
    blocks_a = triton.cdiv(numel_a, BWD_BLOCK)
    num_blocks = blocks_a + triton.cdiv(numel_b, BWD_BLOCK)
    # Few programs: with g == 1 (the usual loss.backward()) they all return at once.
    programs = num_sms(a.device.index) * CUDA_CONFIG.bwd_programs_per_sm if a.is_cuda else 2
    _backward(
        (min(num_blocks, programs),),
        (grad_loss, loss, a, numel_a, b, numel_b, blocks_a, num_blocks),
        dict(BLOCK=BWD_BLOCK, PRESCALED=prescaled(a.dtype)),
        traced, num_warps=BWD_NUM_WARPS,
    )


# --------------------------------------------------------------------------------------------
# Autograd Function
# --------------------------------------------------------------------------------------------


class TokenL1LossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, perm, want_grad_pred: bool, want_grad_target: bool):
        B, Nt = perm.shape
        if B == 0 or Nt == 0:
            # Nothing can be valid: loss 0 and zero gradients, decided from shapes alone.
            loss = torch.zeros((), dtype=torch.float32, device=pred.device)
            ctx.empty = True
            ctx.want = (want_grad_pred, want_grad_target)
            ctx.save_for_backward(pred, target)
            return loss
        with on_device(pred.device):
            loss, grad_pred, grad_target = _launch_forward(pred, target, perm, want_grad_pred, want_grad_target)
        ctx.empty = False
        ctx.want = (want_grad_pred, want_grad_target)
        ctx.loss, ctx.grad_pred, ctx.grad_target = loss, grad_pred, grad_target
        if want_grad_pred or want_grad_target:
            ctx.save_for_backward(pred, target, perm)
        return loss[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        want_grad_pred, want_grad_target = ctx.want
        if ctx.empty:
            pred, target = ctx.saved_tensors
            return (
                torch.zeros_like(pred) if want_grad_pred else None,
                torch.zeros_like(target) if want_grad_target else None,
                None,
                None,
                None,
            )
        loss, grad_pred, grad_target = ctx.loss, ctx.grad_pred, ctx.grad_target
        with on_device(grad_loss.device):
            if grad_pred is None and grad_target is None:
                # A second backward through a retained graph: the buffers of the first were handed
                # to autograd (it may own them as .grad now), so write fresh ones.
                pred, target, perm = ctx.saved_tensors
                loss, grad_pred, grad_target = _launch_forward(pred, target, perm, want_grad_pred, want_grad_target)
            # Hand the buffers over without keeping a reference, so autograd can adopt them as .grad.
            ctx.grad_pred = ctx.grad_target = None
            _launch_backward(grad_loss, loss, grad_pred, grad_target)
        return grad_pred, grad_target, None, None, None


# --------------------------------------------------------------------------------------------
# Custom ops (torch.library.triton_op: torch.compile traces into the kernels) + autograd
# --------------------------------------------------------------------------------------------


@torch.library.triton_op("collat::token_l1_fwd", mutates_args=())
def token_l1_fwd(
    pred: torch.Tensor, target: torch.Tensor, perm: torch.Tensor, want_grad_pred: bool, want_grad_target: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss_and_scale fp32 [2], grad_pred buffer, grad_target buffer); a buffer that is not wanted
    is an empty tensor. The loss is loss_and_scale[0]."""
    B, Nt = perm.shape
    if B == 0 or Nt == 0:
        loss = torch.zeros(2, dtype=torch.float32, device=pred.device)
        grad_pred, grad_target = torch.zeros_like(pred), torch.zeros_like(target)
    else:
        loss, grad_pred, grad_target = _launch_forward(pred, target, perm, want_grad_pred, want_grad_target, traced=True)
    return loss, grad_pred if want_grad_pred else pred.new_empty(0), grad_target if want_grad_target else target.new_empty(0)


@torch.library.triton_op("collat::token_l1_bwd", mutates_args=("grad_pred", "grad_target"))
def token_l1_bwd(grad_loss: torch.Tensor, loss: torch.Tensor, grad_pred: torch.Tensor, grad_target: torch.Tensor) -> None:
    """Scales the forward's gradient buffers in place for the incoming gradient grad_loss[0]."""
    _launch_backward(grad_loss, loss, grad_pred, grad_target, traced=True)


def _l1_setup_context(ctx, inputs, output):
    _, _, _, want_grad_pred, want_grad_target = inputs
    loss, grad_pred, grad_target = output
    ctx.want = (want_grad_pred, want_grad_target)
    ctx.save_for_backward(loss, grad_pred, grad_target)
    ctx.mark_non_differentiable(grad_pred, grad_target)


def _l1_backward(ctx, grad_loss, _grad_pred, _grad_target):
    loss, grad_pred, grad_target = ctx.saved_tensors
    token_l1_bwd(grad_loss.contiguous(), loss, grad_pred, grad_target)
    want_grad_pred, want_grad_target = ctx.want
    return grad_pred if want_grad_pred else None, grad_target if want_grad_target else None, None, None, None


token_l1_fwd.register_autograd(_l1_backward, setup_context=_l1_setup_context)
