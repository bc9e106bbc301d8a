"""Adversarial inputs to token_l1_loss on every backend this machine has: the Triton kernels (run by
the interpreter on CPU, the launcher code CUDA runs) and the plain-PyTorch reference that CPU tensors
take without the interpreter. Results are checked against an independent loop in float64."""
import math

import pytest
import torch
from collat.kernels import _utils, token_l1

from collat.ops.token_l1 import token_l1_loss

BACKENDS = ["triton", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        # Everything the launchers allocate starts as garbage: NaN in float buffers, a large count in
        # the ticket; the workspace is allocated afresh through the same hook.
        def poisoned(shape, dtype, device):
            return torch.full(shape, math.nan if dtype.is_floating_point else 12345, dtype=dtype, device=device)

        monkeypatch.setattr(token_l1, "_new_buffer", poisoned)
        monkeypatch.setattr(token_l1, "_WORKSPACES", {})
        yield "triton"
    else:
        monkeypatch.setattr(_utils, "INTERPRET", False)  # CPU tensors then take the reference
        yield "reference"


def independent(pred, target, perm, g=1.0):
    """Loss and gradients of the docstring by loops in float64: entries with 0 <= perm[b, j] < Np only."""
    B, Np, D = pred.shape
    pairs = [(b, j, int(perm[b, j])) for b in range(B) for j in range(perm.shape[1]) if 0 <= perm[b, j] < Np]
    scale = 1.0 / (max(len(pairs), 1) * D)
    loss = 0.0
    grad_pred = torch.zeros(pred.shape, dtype=torch.float64)
    grad_target = torch.zeros(target.shape, dtype=torch.float64)
    for b, j, i in pairs:
        diff = pred[b, i].double() - target[b, j].double()
        loss += float(diff.abs().sum()) * scale
        grad_pred[b, i] = torch.sign(diff).nan_to_num(0.0) * scale * g
        grad_target[b, j] = -torch.sign(diff).nan_to_num(0.0) * scale * g
    return loss, grad_pred, grad_target


def ours(pred, target, perm, g=1.0):
    pred = pred.detach().requires_grad_()
    target = target.detach().requires_grad_()
    loss = token_l1_loss(pred, target, perm)
    grad_pred, grad_target = torch.autograd.grad(loss, [pred, target], torch.tensor(g))
    return loss, grad_pred, grad_target


def check(pred, target, perm, g=1.0, leaves=None):
    loss, grad_pred, grad_target = ours(pred, target, perm, g)
    expected = independent(pred, target, perm, g)
    if math.isnan(expected[0]):
        assert math.isnan(loss.item())
    else:
        assert math.isclose(loss.item(), expected[0], rel_tol=1e-5, abs_tol=1e-7), (loss.item(), expected[0])
    torch.testing.assert_close(grad_pred.double(), expected[1], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grad_target.double(), expected[2], rtol=1e-5, atol=1e-9)


def random_perm(B, Np, Nt, seed=0):
    generator = torch.Generator().manual_seed(seed)
    perm = torch.full((B, Nt), -1, dtype=torch.int64)
    for b in range(B):
        matched = min(Np, Nt) - b % 2
        perm[b, torch.randperm(Nt, generator=generator)[:matched]] = torch.randperm(Np, generator=generator)[:matched]
    return perm


LAYOUTS = {
    "expand_batch": ((1, 7, 6), lambda t: t.expand(3, 7, 6)),
    "expand_rows": ((3, 1, 6), lambda t: t.expand(3, 7, 6)),
    "expand_width": ((3, 7, 1), lambda t: t.expand(3, 7, 6)),
    "transposed": ((3, 6, 7), lambda t: t.transpose(1, 2)),
    "offset_strided": ((4, 9, 13), lambda t: t[1:, 2:, 1::2]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["pred", "target", "both"])
@pytest.mark.parametrize("g", [1.0, -0.3])
def test_every_layout_of_every_input(backend, layout, which, g):
    leaf_shape, view = LAYOUTS[layout]
    pred = view(torch.randn(leaf_shape)) if which in ("pred", "both") else torch.randn(3, 7, 6)
    target = view(torch.randn(leaf_shape)) if which in ("target", "both") else torch.randn(3, 7, 6)
    check(pred, target, random_perm(3, 7, 7), g)


@pytest.mark.parametrize("perm_layout", ["transposed", "expanded", "offset"])
def test_perm_layouts(backend, perm_layout):
    pred, target = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    perm = {
        "transposed": random_perm(3, 7, 7).t().contiguous().t(),
        "expanded": random_perm(1, 7, 7).expand(3, 7),
        "offset": random_perm(4, 7, 9)[1:, 2:],
    }[perm_layout]
    check(pred, target, perm, 0.5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values_where_nothing_is_matched_are_ignored(backend, value):
    # Invalid target rows (perm -1 or out of range) and predicted rows no target row points to
    # never reach the loss or a gradient.
    pred, target = torch.randn(3, 7, 6), torch.randn(3, 8, 6)
    perm = torch.tensor([[0, 1, -1, 3, 9, -7, 5, 2], [6, -1, -1, 0, 1, 2, 3, 4], [-1] * 8])
    target[0, 2] = value
    target[0, 4, 3] = value  # perm 9 >= Np
    target[2] = value  # an item with nothing valid
    pred[0, 4] = value  # nobody matches row 4 of item 0
    pred[1, 5, 0] = value
    loss, grad_pred, grad_target = ours(pred, target, perm, 0.7)
    assert math.isfinite(loss.item())
    assert torch.isfinite(grad_pred).all() and torch.isfinite(grad_target).all()
    check(pred, target, perm, 0.7)


def test_a_nan_in_a_matched_row_gives_a_nan_loss_and_zero_gradient_there(backend):
    pred, target = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    perm = torch.arange(5).expand(2, 5)
    pred[0, 3, 1] = math.nan
    check(pred, target, perm, 1.0)  # as torch's abs backward: sign(NaN) = 0


@pytest.mark.parametrize("shape", [(0, 5, 5, 4), (3, 0, 5, 4), (3, 5, 0, 4), (0, 0, 0, 4)])
def test_every_empty_dimension(backend, shape):
    B, Np, Nt, D = shape
    pred, target = torch.randn(B, Np, D), torch.randn(B, Nt, D)
    perm = torch.full((B, Nt), -1, dtype=torch.int64)
    if Np and Nt:
        perm[:] = torch.arange(min(Np, Nt)).repeat(Nt // max(1, min(Np, Nt)) + 1)[:Nt]
    loss, grad_pred, grad_target = ours(pred, target, perm, 2.0)
    assert loss.item() == 0.0 and loss.shape == ()
    assert grad_pred.shape == pred.shape and (grad_pred == 0).all()
    assert grad_target.shape == target.shape and (grad_target == 0).all()


def test_zero_width_is_refused(backend):
    with pytest.raises(ValueError, match="token_l1_loss: the token width D must be at least 1, got 0"):
        token_l1_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 0), torch.zeros(2, 3, dtype=torch.int64))


def test_a_call_interrupted_at_any_program_leaves_every_later_call_exact(interrupter):
    # Ctrl-C between any two programs of the interpreter (prepare, forward, backward kernels), and
    # between launches, must not leave state (a ticket, a workspace) that a later call inherits.
    pred, target = torch.randn(3, 7, 6), torch.randn(3, 7, 6)
    perm = random_perm(3, 7, 7)
    other_pred = torch.randn(3, 7, 6)  # the interrupted calls use other values: stale state would show
    with interrupter() as count:
        ours(other_pred, target, perm, 0.5)
    assert count.programs >= 6
    for n in range(1, count.programs + 1):
        with pytest.raises(KeyboardInterrupt), interrupter(n):
            ours(other_pred, target, perm, 0.5)
        check(pred, target, perm, 0.5)


BAD_ARGUMENTS = [
    (dict(pred=[[1.0]]), TypeError, ["pred", "torch.Tensor", "list"]),
    (dict(perm=None), TypeError, ["perm", "torch.Tensor", "NoneType"]),
    (dict(pred=torch.randn(5, 3)), ValueError, ["pred", "[B, Np, D]", "(5, 3)"]),
    (dict(target=torch.randn(2, 5, 3, 1)), ValueError, ["target", "[B, Nt, D]", "(2, 5, 3, 1)"]),
    (dict(target=torch.randn(3, 5, 3)), ValueError, ["target", "batch", "2", "3"]),
    (dict(target=torch.randn(2, 5, 4)), ValueError, ["target", "D", "3", "4"]),
    (dict(perm=torch.zeros(2, 4, dtype=torch.int64)), ValueError, ["perm", "(2, 5)", "(2, 4)"]),
    (dict(perm=torch.zeros(2, 5, dtype=torch.int32)), TypeError, ["perm", "torch.int64", "torch.int32"]),
    (dict(perm=torch.zeros(2, 5)), TypeError, ["perm", "torch.int64", "torch.float32"]),
    (dict(pred=torch.randn(2, 5, 3, dtype=torch.float64)), TypeError, ["pred", "float32", "torch.float64"]),
    (dict(pred=torch.ones(2, 5, 3, dtype=torch.int64)), TypeError, ["pred", "float32", "torch.int64"]),
    (dict(pred=torch.randn(2, 5, 3).half()), TypeError, ["target", "torch.float16", "torch.float32"]),
    (dict(target=torch.randn(2, 5, 3, device="meta")), ValueError, ["one device", "target on meta"]),
    (dict(perm=torch.zeros(2, 5, dtype=torch.int64, device="meta")), ValueError, ["one device", "perm on meta"]),
]


@pytest.mark.parametrize("change, error, words", BAD_ARGUMENTS, ids=range(len(BAD_ARGUMENTS)))
def test_bad_arguments_give_a_clear_error_naming_them(backend, change, error, words):
    args = dict(pred=torch.randn(2, 5, 3), target=torch.randn(2, 5, 3), perm=torch.zeros(2, 5, dtype=torch.int64))
    args.update(change)
    with pytest.raises(error) as info:
        token_l1_loss(**args)
    message = str(info.value)
    assert message.startswith("token_l1_loss:"), message
    for word in words:
        assert word in message, (word, message)
