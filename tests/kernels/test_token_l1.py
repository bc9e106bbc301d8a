"""token_l1_loss (kernels/token_l1.py) against collat.reference.token_l1_loss in float64.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest), so
the CPU shapes are small; the real shape runs in the GPU-marked tests.
"""
import dataclasses
import math
import warnings

import pytest
import torch
from collat.kernels import token_l1

from collat.ops import reference
from collat.ops.token_l1 import check_perm, token_l1_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_perm(B, Np, Nt, invalid_fraction=0.25, generator=None, device=DEVICE):
    """A random partial permutation: distinct predicted rows, some target rows -1 (and so some
    predicted rows unmatched)."""
    perm = torch.full((B, Nt), -1, dtype=torch.int64)
    for b in range(B):
        matched = min(Np, Nt)
        rows = torch.randperm(Nt, generator=generator)[:matched]
        perm[b, rows] = torch.randperm(Np, generator=generator)[:matched]
    drop = torch.rand(B, Nt, generator=generator) < invalid_fraction
    perm[drop] = -1
    return perm.to(device)


def make_inputs(B, Np, Nt, D, dtype, device=DEVICE):
    pred = torch.randn(B, Np, D, dtype=torch.float32).to(device=device, dtype=dtype)
    target = torch.randn(B, Nt, D, dtype=torch.float32).to(device=device, dtype=dtype)
    return pred, target, random_perm(B, Np, Nt, device=device)


def loss_and_grads(fn, pred, target, perm, grad_loss):
    """fn's loss and its gradients with respect to pred and target (both require grad)."""
    pred = pred.detach().clone().requires_grad_(True)
    target = target.detach().clone().requires_grad_(True)
    loss = fn(pred, target, perm)
    grad_pred, grad_target = torch.autograd.grad(loss, [pred, target], grad_loss.to(loss.dtype))
    return loss, grad_pred, grad_target


def oracle(pred, target, perm, grad_loss):
    """The reference in float64 on the same input values."""
    return loss_and_grads(reference.token_l1_loss, pred.double(), target.double(), perm, grad_loss)


# ------------------------------------------------------------------------------------------
# Forward and gradients against the float64 reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 3, 77, 128])
@pytest.mark.parametrize("N", [1, 13, 77])
@pytest.mark.parametrize("B", [0, 1, 3])
def test_fp32_matches_float64_reference(B, N, D):
    pred, target, perm = make_inputs(B, N, N, D, torch.float32)
    grad_loss = torch.tensor(0.37)  # not 1: the backward has to rescale
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, grad_loss)
    ref_loss, ref_grad_pred, ref_grad_target = oracle(pred, target, perm, grad_loss)

    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad_pred.dtype == torch.float32 and grad_target.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_pred.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_target.double(), ref_grad_target, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("grad_loss", [1.0, -2.5])
def test_unit_and_other_incoming_gradients(grad_loss):
    # grad_loss == 1 takes the kernel's no-op path (the forward already wrote the gradient).
    pred, target, perm = make_inputs(2, 13, 13, 77, torch.float32)
    g = torch.tensor(grad_loss)
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, g)
    ref_loss, ref_grad_pred, ref_grad_target = oracle(pred, target, perm, g)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_pred.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_target.double(), ref_grad_target, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("Np, Nt", [(20, 13), (5, 13)])
def test_different_numbers_of_predicted_and_target_rows(Np, Nt):
    pred, target, perm = make_inputs(2, Np, Nt, 33, torch.float32)
    g = torch.tensor(1.3)
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, g)
    ref_loss, ref_grad_pred, ref_grad_target = oracle(pred, target, perm, g)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_pred.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_target.double(), ref_grad_target, rtol=1e-5, atol=1e-9)


def test_no_predicted_rows():
    # Np = 0: nothing can be matched (the reference's gather cannot express this case).
    pred, target, perm = make_inputs(2, 0, 4, 33, torch.float32)
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0))
    assert loss.item() == 0.0 and grad_pred.shape == (2, 0, 33)
    assert torch.equal(grad_target, torch.zeros_like(grad_target))


def _max_error(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _allowed_error(ours, torch_own, exact):
    """~2x PyTorch's own error; plus one unit in the last place for bf16 in the Triton interpreter,
    whose fp32 -> bf16 cast truncates (Triton 3.6 passes no rounding mode there) where the GPU
    rounds to nearest even."""
    slack = 1e-6 * exact.abs().max().item() + 1e-12 if exact.numel() else 0.0
    if ours.dtype == torch.bfloat16 and not ours.is_cuda and exact.numel():
        slack += torch.finfo(torch.bfloat16).eps * exact.abs().max().item()
    return 2 * _max_error(torch_own, exact) + slack


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, N, D", [(3, 13, 77), (2, 77, 3), (1, 7, 128)])
@pytest.mark.parametrize("grad_loss", [1.0, 0.01])
def test_low_precision_within_twice_torch_error(dtype, B, N, D, grad_loss):
    # FlashAttention-style bound: our error vs the fp64 oracle is at most ~2x the error of
    # PyTorch's own computation on the same low-precision inputs.
    pred, target, perm = make_inputs(B, N, N, D, dtype)
    g = torch.tensor(grad_loss)
    ours = loss_and_grads(token_l1_loss, pred, target, perm, g)
    torch_own = loss_and_grads(reference.token_l1_loss, pred, target, perm, g)
    exact = oracle(pred, target, perm, g)
    assert ours[1].dtype == dtype and ours[2].dtype == dtype
    for name, o, t, e in zip(("loss", "grad_pred", "grad_target"), ours, torch_own, exact):
        assert _max_error(o, e) <= _allowed_error(o, t, e), name


def test_fp16_buffers_carry_the_bare_sign():
    # fp16 cannot hold 1/(D * #valid) once D * #valid > 2^25 (too big for the interpreter), so the
    # forward stores sign(diff) unscaled for fp16 and the backward always applies g/(D * #valid);
    # with a loss-scaler-sized g the result must match PyTorch's own fp16 gradient.
    pred, target, perm = make_inputs(2, 9, 9, 5, torch.float16)
    assert not token_l1.prescaled(torch.float16)
    _, grad_pred, _ = token_l1._launch_forward(pred, target, perm, True, False)
    assert set(grad_pred.unique().tolist()) <= {-1.0, 0.0, 1.0}
    g = torch.tensor(65536.0)
    ours = loss_and_grads(token_l1_loss, pred, target, perm, g)
    exact = oracle(pred, target, perm, g)
    torch_own = loss_and_grads(reference.token_l1_loss, pred, target, perm, g)
    for o, t, e in zip(ours, torch_own, exact):
        assert _max_error(o, e) <= _allowed_error(o, t, e)


def _independent_sign_gradients(pred, target, perm, dtype):
    """sign(pred[b, i] - target[b, j]) / (D * #valid) at (b, i) and its negative at (b, j), in a loop."""
    B, Np, D = pred.shape
    grad_pred, grad_target = torch.zeros(pred.shape), torch.zeros(target.shape)
    pairs = [(b, j, int(perm[b, j])) for b in range(B) for j in range(perm.shape[1]) if 0 <= perm[b, j] < Np]
    scale = torch.tensor(1.0) / torch.tensor(float(len(pairs) * D))  # fp32, as the kernel rounds it
    for b, j, i in pairs:
        sign = torch.sign(pred[b, i].float() - target[b, j].float())
        grad_pred[b, i] = sign * scale
        grad_target[b, j] = -sign * scale
    return grad_pred.to(dtype), grad_target.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_writes_the_final_gradient_and_unit_g_skips_the_rewrite(dtype):
    # The forward must leave sign(diff) / (D * #valid) in the buffers, so that loss.backward() (g == 1)
    # has nothing left to do: a forward storing any other scale, which a backward that always
    # rewrites would hide, fails the first check; a backward that rewrites at g == 1 fails the second.
    pred, target, perm = make_inputs(3, 13, 11, 33, dtype)
    perm[1, 2:] = -1
    loss, grad_pred, grad_target = token_l1._launch_forward(pred, target, perm, True, True)
    expected_pred, expected_target = _independent_sign_gradients(pred, target, perm, dtype)
    assert token_l1.prescaled(dtype)
    assert torch.equal(grad_pred, expected_pred.to(DEVICE)) and torch.equal(grad_target, expected_target.to(DEVICE))
    marked = (perm[0] >= 0).nonzero()[0, 0]
    sentinel = grad_pred[0, perm[0, marked]].clone()
    grad_pred[0, perm[0, marked]] = 2 * sentinel  # a value no rewrite would leave in place
    token_l1._launch_backward(torch.tensor(1.0, device=DEVICE), loss, grad_pred, grad_target)
    assert torch.equal(grad_pred[0, perm[0, marked]], 2 * sentinel), "the backward rewrote the buffers at g == 1"
    token_l1._launch_backward(torch.tensor(0.5, device=DEVICE), loss, grad_pred, grad_target)
    torch.testing.assert_close(grad_pred[0, perm[0, marked]], 0.5 * sentinel)  # rewritten: g != 1


# ------------------------------------------------------------------------------------------
# Special perms
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_invalid_perm_gives_zero_loss_and_zero_grads(dtype):
    pred, target, _ = make_inputs(3, 13, 13, 77, dtype)
    perm = torch.full((3, 13), -1, dtype=torch.int64, device=DEVICE)
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(0.5))
    assert loss.item() == 0.0
    assert torch.equal(grad_pred, torch.zeros_like(grad_pred))
    assert torch.equal(grad_target, torch.zeros_like(grad_target))


@pytest.mark.parametrize("grad_loss", [1.0, 0.01])
def test_identity_perm_gives_gradients_to_both(grad_loss):
    # L_ut: every row valid, matched to itself; the mean |a - b| over all B*N*D elements.
    B, N, D = 2, 13, 77
    pred, target, _ = make_inputs(B, N, N, D, torch.float32)
    perm = torch.arange(N, device=DEVICE).expand(B, N).contiguous()
    g = torch.tensor(grad_loss)
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, g)
    diff = pred.double() - target.double()
    torch.testing.assert_close(loss.double(), diff.abs().mean(), rtol=1e-5, atol=1e-7)
    expected = diff.sign() * grad_loss / diff.numel()
    torch.testing.assert_close(grad_pred.double(), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_target.double(), -expected, rtol=1e-5, atol=1e-9)


def test_sign_of_zero_difference_is_zero():
    pred, target, _ = make_inputs(1, 4, 4, 8, torch.float32)
    target[0, 1] = pred[0, 2]  # target row 1 matched to pred row 2 with zero difference
    perm = torch.tensor([[0, 2, -1, 3]], device=DEVICE)
    _, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0))
    assert torch.equal(grad_pred[0, 2], torch.zeros(8, device=DEVICE))
    assert torch.equal(grad_target[0, 1], torch.zeros(8, device=DEVICE))
    assert torch.equal(grad_pred[0, 1], torch.zeros(8, device=DEVICE))  # unmatched
    assert (grad_pred[0, 0] != 0).all()


def test_nan_input_gives_nan_loss_and_zero_gradient_like_torch():
    pred, target, perm = make_inputs(1, 5, 5, 4, torch.float32)
    perm = torch.arange(5, device=DEVICE)[None]
    pred[0, 3, 1] = math.nan
    loss, grad_pred, _ = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0))
    ref_loss, ref_grad_pred, _ = oracle(pred, target, perm, torch.tensor(1.0))
    assert math.isnan(loss.item()) and math.isnan(ref_loss.item())
    assert not ref_grad_pred.isnan().any()  # torch's abs backward: sign(NaN) = 0
    torch.testing.assert_close(grad_pred.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Layouts, buffers, determinism, autograd plumbing
# ------------------------------------------------------------------------------------------


def test_non_contiguous_inputs():
    B, N, D = 2, 13, 77
    pred = torch.randn(B, D, N, device=DEVICE).transpose(1, 2)  # stride along D is N
    target = torch.randn(B, 2 * N, D + 5, device=DEVICE)[:, ::2, 2 : 2 + D]  # row stride 2 * (D + 5)
    perm = random_perm(B, N, N).t().contiguous().t()  # column-major [B, N]
    pred = pred.requires_grad_(True)
    target = target.requires_grad_(True)
    assert not pred.is_contiguous() and not target.is_contiguous() and not perm.is_contiguous()
    g = torch.tensor(0.7)
    loss = token_l1_loss(pred, target, perm)
    grad_pred, grad_target = torch.autograd.grad(loss, [pred, target], g)
    ref_loss, ref_grad_pred, ref_grad_target = oracle(pred.detach(), target.detach(), perm, g)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_pred.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_target.double(), ref_grad_target, rtol=1e-5, atol=1e-9)


def test_every_buffer_element_is_written(monkeypatch):
    # Poison everything the launchers allocate: grad_pred's unmatched rows and grad_target's
    # invalid rows must come out as exact zeros, not NaN.
    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan if dtype.is_floating_point else 12345, dtype=dtype, device=device)

    monkeypatch.setattr(token_l1, "_new_buffer", poisoned)
    monkeypatch.setattr(token_l1, "_WORKSPACES", {})  # the workspace too, and the ticket
    pred, target, perm = make_inputs(3, 13, 13, 77, torch.float32)
    perm[1] = -1
    for g in (1.0, 0.3):
        loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(g))
        ref = oracle(pred, target, perm, torch.tensor(g))
        assert not loss.isnan() and not grad_pred.isnan().any() and not grad_target.isnan().any()
        torch.testing.assert_close(loss.double(), ref[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(grad_pred.double(), ref[1], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(grad_target.double(), ref[2], rtol=1e-5, atol=1e-9)
        unmatched = torch.ones(3, 13, dtype=torch.bool, device=DEVICE)
        for b in range(3):
            unmatched[b, perm[b][perm[b] >= 0]] = False
        assert unmatched.any()
        assert torch.equal(grad_pred[unmatched], torch.zeros_like(grad_pred[unmatched]))


def test_deterministic():
    pred, target, perm = make_inputs(3, 77, 77, 77, torch.float32)
    first = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(0.3))
    second = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(0.3))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_loss_does_not_depend_on_the_grid_size(monkeypatch):
    # Partial sums are per tile, not per program: a different grid gives the same bits.
    pred, target, perm = make_inputs(3, 77, 77, 77, torch.float32)
    name = "CUDA_CONFIG" if DEVICE == "cuda" else "CPU_CONFIG"
    base = getattr(token_l1, name)
    results = []
    for programs in (1, 2, 5):
        field = "programs_per_sm" if DEVICE == "cuda" else "cpu_programs"
        monkeypatch.setattr(token_l1, name, dataclasses.replace(base, **{field: programs}))
        results.append(loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(0.3)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_no_grad_forward_and_single_input_gradients():
    pred, target, perm = make_inputs(2, 13, 13, 20, torch.float32)
    ref_loss, ref_grad_pred, ref_grad_target = oracle(pred, target, perm, torch.tensor(1.0))
    with torch.no_grad():
        torch.testing.assert_close(token_l1_loss(pred, target, perm).double(), ref_loss, rtol=1e-5, atol=1e-7)

    p = pred.clone().requires_grad_(True)
    loss = token_l1_loss(p, target, perm)  # L_ct: gradient to pred only
    (grad_pred,) = torch.autograd.grad(loss, [p])
    torch.testing.assert_close(grad_pred.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)

    t = target.clone().requires_grad_(True)
    loss = token_l1_loss(pred, t, perm)  # stop-gradient on the predicted branch
    (grad_target,) = torch.autograd.grad(loss, [t])
    torch.testing.assert_close(grad_target.double(), ref_grad_target, rtol=1e-5, atol=1e-9)


def test_grads_accumulate_and_retained_graph_backward_twice():
    pred, target, perm = make_inputs(2, 13, 13, 20, torch.float32)
    _, ref_grad_pred, _ = oracle(pred, target, perm, torch.tensor(1.0))
    p = pred.clone().requires_grad_(True)
    token_l1_loss(p, target, perm).backward()
    (0.5 * token_l1_loss(p, target, perm)).backward()
    torch.testing.assert_close(p.grad.double(), 1.5 * ref_grad_pred, rtol=1e-5, atol=1e-9)

    p.grad = None
    loss = token_l1_loss(p, target, perm)
    loss.backward(retain_graph=True)
    first = p.grad.clone()
    (2.0 * loss).backward()  # a second pass may not reuse (or corrupt) the first pass's buffers
    torch.testing.assert_close(first.double(), ref_grad_pred, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(p.grad.double(), 3 * ref_grad_pred, rtol=1e-5, atol=1e-9)


@pytest.mark.skipif(DEVICE != "cpu", reason="interrupts programs of the Triton interpreter")
@pytest.mark.parametrize("interrupt_at", [1, 2, 3, 4, 5, 6])
def test_a_call_interrupted_mid_launch_leaves_later_calls_exact(interrupt_at, interrupter):
    # Issue 17.3: Ctrl-C inside a launch (the interpreter runs one program after the other) left the
    # reduction ticket counted up, and every later loss in the process was wrong.
    pred, target, perm = make_inputs(2, 13, 13, 77, torch.float32)
    expected = oracle(pred, target, perm, torch.tensor(1.0))
    with interrupter(interrupt_at), pytest.raises(KeyboardInterrupt):
        loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0))
    for _ in range(2):
        ours = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0))
        for name, o, e in zip(("loss", "grad_pred", "grad_target"), ours, expected):
            torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-9, msg=lambda m: f"{name}: {m}")


def _independent_loss(pred, target, perm):
    """The loss of the docstring, by a loop in float64 over the entries with 0 <= perm[b, j] < Np."""
    B, Np, D = pred.shape
    total, count = 0.0, 0
    for b in range(B):
        for j in range(perm.shape[1]):
            i = int(perm[b, j])
            if 0 <= i < Np:
                total += float((pred[b, i].double() - target[b, j].double()).abs().sum())
                count += 1
    return total / (max(count, 1) * D)


@pytest.mark.parametrize("backend", ["triton", "reference_fallback"])
def test_out_of_range_perm_entries_and_what_invalid_rows_hold_are_ignored(backend, monkeypatch):
    # Issue 17.16: the fallback raised "index 7 is out of bounds" for perm >= Np, although the
    # docstring says such entries are ignored; an invalid target row or an unmatched predicted row
    # holding NaN must not reach the loss or any gradient either.
    if backend == "reference_fallback":
        monkeypatch.setattr("collat.kernels._utils.INTERPRET", False)
    pred, target, _ = make_inputs(2, 7, 9, 5, torch.float32, device="cpu")
    perm = torch.tensor([[0, 7, 3, -1, 12, -5, 6, 2, 1], [9, -1, -1, 4, 0, 7, 100, 5, -2]])
    target[0, 1] = math.nan  # perm 7 >= Np: invalid
    target[1, 2] = math.inf  # perm -1
    pred[1, 6] = math.nan  # matched by nobody
    loss, grad_pred, grad_target = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0))
    assert math.isclose(loss.item(), _independent_loss(pred, target, perm), rel_tol=1e-6)
    expected_pred, expected_target = _independent_sign_gradients(pred, target, perm, torch.float32)
    torch.testing.assert_close(grad_pred, expected_pred, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_target, expected_target, rtol=1e-6, atol=0)


@pytest.mark.parametrize("want", [(True, False), (False, True), (True, True), (False, False)])
@pytest.mark.parametrize("B", [0, 3])
def test_custom_op_passes_opcheck(want, B):
    pred, target, perm = make_inputs(B, 9, 7, 17, torch.float32)
    pred.requires_grad_(want[0])
    target.requires_grad_(want[1])
    torch.library.opcheck(torch.ops.collat.token_l1_fwd.default, (pred, target, perm, *want))


def test_torch_compile_traces_into_the_kernels():
    # torch.library.triton_op: the compiled graphs hold the Triton kernels (triton_kernel_wrapper_*),
    # and the results equal eager bit for bit, for g == 1 and another g. On CPU the interpreter runs
    # them under aot_eager (Inductor cannot compile user Triton kernels without a GPU driver).
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    pred, target, perm = make_inputs(3, 13, 11, 33, torch.float32)
    backend = AotEagerAndRecordGraphs() if DEVICE == "cpu" else "inductor"
    step = lambda p, t, m: 3 * token_l1_loss(p, t, m)  # noqa: E731
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for g in (1.0 / 3, 0.7):
        ours = loss_and_grads(compiled, pred, target, perm, torch.tensor(g))
        eager = loss_and_grads(step, pred, target, perm, torch.tensor(g))
        for a, b in zip(ours, eager):
            assert torch.equal(a, b)
    if DEVICE == "cpu":
        assert "triton_kernel_wrapper" in str(backend.fw_graphs[0].code)
        assert "triton_kernel_wrapper" in str(backend.bw_graphs[0].code)


def test_cpu_without_interpreter_uses_the_reference(monkeypatch):
    monkeypatch.setattr("collat.kernels._utils.INTERPRET", False)  # the dispatch follows the import-time snapshot
    pred, target, perm = make_inputs(2, 13, 13, 20, torch.float32, device="cpu")
    launched = []
    monkeypatch.setattr(token_l1, "_launch_forward", lambda *a: launched.append(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = token_l1_loss(pred, target, perm)
    assert not launched
    assert torch.equal(loss, reference.token_l1_loss(pred, target, perm))


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def _valid():
    pred, target, perm = make_inputs(2, 5, 5, 3, torch.float32)
    return dict(pred=pred, target=target, perm=perm)


@pytest.mark.parametrize(
    "change, error, words",
    [
        (dict(pred=[[1.0]]), TypeError, ["pred", "torch.Tensor", "list"]),
        (dict(pred=torch.randn(5, 3)), ValueError, ["pred", "[B, Np, D]", "(5, 3)"]),
        (dict(target=torch.randn(2, 5, 3, 1)), ValueError, ["target", "[B, Nt, D]", "(2, 5, 3, 1)"]),
        (dict(target=torch.randn(3, 5, 3)), ValueError, ["target", "batch", "2", "3"]),
        (dict(target=torch.randn(2, 5, 4)), ValueError, ["target", "D", "3", "4"]),
        (dict(perm=torch.zeros(2, 4, dtype=torch.int64)), ValueError, ["perm", "(2, 5)", "(2, 4)"]),
        (dict(perm=torch.zeros(2, dtype=torch.int64)), ValueError, ["perm", "(2, 5)", "(2,)"]),
        (dict(perm=torch.zeros(2, 5, dtype=torch.int32)), TypeError, ["perm", "torch.int64", "torch.int32"]),
        (dict(pred=torch.randn(2, 5, 3, dtype=torch.float64)), TypeError, ["pred", "float32", "torch.float64"]),
        (dict(pred=torch.randn(2, 5, 3).half()), TypeError, ["target", "torch.float16", "torch.float32"]),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, words):
    args = _valid()
    for key, value in change.items():
        args[key] = value.to(DEVICE) if isinstance(value, torch.Tensor) else value
    with pytest.raises(error) as info:
        token_l1_loss(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_zero_width_raises():
    with pytest.raises(ValueError, match="D must be at least 1"):
        token_l1_loss(torch.randn(1, 2, 0), torch.randn(1, 2, 0), torch.zeros(1, 2, dtype=torch.int64))


def test_mixed_devices_raise():
    args = _valid()
    meta = torch.empty(2, 5, 3, device="meta")
    with pytest.raises(ValueError, match="one device") as info:
        token_l1_loss(args["pred"], meta, args["perm"])
    assert "meta" in str(info.value)
    with pytest.raises(ValueError, match="one device"):
        token_l1_loss(args["pred"], args["target"], args["perm"].to("meta"))


@pytest.mark.parametrize(
    "row, message",
    [([0, 5, -1, 1, 2], "must be -1 or in \\[0, 5\\), got 5"), ([0, -2, 1, 2, 3], "got -2"), ([0, 1, 1, -1, 2], "more than once")],
)
def test_validate_checks_perm_values(row, message):
    args = _valid()
    args["perm"][1] = torch.tensor(row)
    with pytest.raises(ValueError, match=message):
        token_l1_loss(**args, validate=True)
    with pytest.raises(ValueError, match=message):
        check_perm(args["perm"], 5)


def test_validate_accepts_partial_permutations():
    args = _valid()
    token_l1_loss(**args, validate=True)
    check_perm(torch.full((3, 4), -1, dtype=torch.int64), 0)


# ------------------------------------------------------------------------------------------
# GPU at the real shape (run by the lead on an H100/H200)
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [256, 1024])
def test_gpu_real_shape(dtype, B):
    N, D = 77, 512
    lengths = torch.randint(0, N + 1, (B,))
    perm = torch.stack([torch.randperm(N) for _ in range(B)])
    perm[torch.arange(N)[None, :] >= lengths[:, None]] = -1  # valid tokens are a prefix
    perm = perm.cuda()
    pred = torch.randn(B, N, D, device="cuda").to(dtype)
    target = torch.randn(B, N, D, device="cuda").to(dtype)
    for g in (1.0, 0.01):
        ours = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(g, device="cuda"))
        exact = oracle(pred, target, perm, torch.tensor(g, device="cuda"))
        torch_own = loss_and_grads(reference.token_l1_loss, pred, target, perm, torch.tensor(g, device="cuda"))
        again = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(g, device="cuda"))
        for o, t, e, a in zip(ours, torch_own, exact, again):
            assert torch.equal(o, a)  # deterministic
            if dtype == torch.float32:
                torch.testing.assert_close(o.double(), e, rtol=1e-5, atol=1e-9)
            else:
                assert _max_error(o, e) <= _allowed_error(o, t, e)
    # L_ut: identity perm, every row valid, gradients to both.
    identity = torch.arange(N, device="cuda").expand(B, N).contiguous()
    ours = loss_and_grads(token_l1_loss, pred, target, identity, torch.tensor(0.01, device="cuda"))
    exact = oracle(pred, target, identity, torch.tensor(0.01, device="cuda"))
    torch_own = loss_and_grads(reference.token_l1_loss, pred, target, identity, torch.tensor(0.01, device="cuda"))
    for o, t, e in zip(ours, torch_own, exact):
        assert _max_error(o, e) <= _allowed_error(o, t, e)


@pytest.mark.gpu
def test_gpu_poisoned_buffers_and_empty_batch(monkeypatch):
    def poisoned(shape, dtype, device):
        return torch.full(shape, math.nan if dtype.is_floating_point else 12345, dtype=dtype, device=device)

    monkeypatch.setattr(token_l1, "_new_buffer", poisoned)
    monkeypatch.setattr(token_l1, "_WORKSPACES", {})
    pred, target, perm = make_inputs(64, 77, 77, 512, torch.bfloat16, device="cuda")
    ours = loss_and_grads(token_l1_loss, pred, target, perm, torch.tensor(1.0, device="cuda"))
    assert not any(t.isnan().any() for t in ours)
    empty = make_inputs(0, 77, 77, 512, torch.float32, device="cuda")
    loss, grad_pred, _ = loss_and_grads(token_l1_loss, *empty, torch.tensor(1.0, device="cuda"))
    assert loss.item() == 0.0 and grad_pred.shape == (0, 77, 512)
