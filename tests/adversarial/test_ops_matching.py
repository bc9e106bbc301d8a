"""Adversarial inputs to greedy_match and optimal_match, on every backend this machine has: the
compiled C++ kernel (collat._C) and the plain-PyTorch reference that the fronts fall back to.

Both ops are stateless (no workspace, no counters kept between calls), so there is no interrupted-call
case here; the Triton ops' interrupted calls are in the other files of this suite."""
import math

import pytest
import torch
from helpers import assert_valid_perm, grid_inputs

from collat.ops import _ext, matching, reference

BACKENDS = ["compiled", "reference"]
OPS = ["greedy_match", "optimal_match"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "compiled":
        if not _ext.has_kernel("greedy_match", "cpu"):
            pytest.skip("collat._C has no CPU kernels")
    else:
        monkeypatch.setattr(matching, "_has_kernel", lambda op, device_type: False)
    return request.param


def run(op, *args, **kwargs):
    return getattr(matching, op)(*args, **kwargs)


def cost(pred, target, perm):
    """Total matched L1 distance in float64 (exact on grid inputs)."""
    picked = pred.double().gather(1, perm.clamp_min(0)[..., None].expand(-1, -1, pred.shape[-1]))
    return ((target.double() - picked).abs().sum(-1) * (perm >= 0)).sum(1)


LAYOUTS = {
    # name: (leaf shape from (B, N, D), view of the leaf as [B, N, D])
    "expand_batch": (lambda B, N, D: (1, N, D), lambda t, B, N, D: t.expand(B, N, D)),
    "expand_rows": (lambda B, N, D: (B, 1, D), lambda t, B, N, D: t.expand(B, N, D)),
    "transposed": (lambda B, N, D: (B, D, N), lambda t, B, N, D: t.transpose(1, 2)),
    "offset_strided": (lambda B, N, D: (B + 1, N, 2 * D + 1), lambda t, B, N, D: t[1:, :, 1::2]),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("which", ["pred", "target", "both"])
def test_every_layout_gives_the_contiguous_result(backend, op, layout, which):
    B, N, D = 3, 9, 5
    leaf_shape, view = LAYOUTS[layout]
    inputs = {}
    for name in ("pred", "target"):
        if name == which or which == "both":
            leaf = torch.randint(-8, 9, leaf_shape(B, N, D)).float().div(4)
            inputs[name] = view(leaf, B, N, D)
        else:
            inputs[name] = torch.randint(-8, 9, (B, N, D)).float().div(4)
    lengths = torch.tensor([9, 4, 0, 7])[::1][:3]
    strided_lengths = torch.tensor([9, 0, 4, 0, 0, 0])[::2]  # the same values, stride 2
    perm = run(op, inputs["pred"], inputs["target"], strided_lengths)
    contiguous = run(op, inputs["pred"].contiguous(), inputs["target"].contiguous(), lengths)
    assert_valid_perm(perm, lengths, N)
    if op == "greedy_match":
        assert torch.equal(perm, contiguous)
        assert torch.equal(perm, reference.greedy_match(inputs["pred"].contiguous(), inputs["target"].contiguous(), lengths))
    else:  # equal-cost optima may differ, the cost may not
        assert torch.equal(cost(inputs["pred"], inputs["target"], perm), cost(inputs["pred"], inputs["target"], contiguous))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_padding_rows_of_the_target_change_nothing(backend, op, value):
    # Target rows j >= L_b are not matched: whatever they hold cannot move a valid row's match.
    pred, target = grid_inputs(3, 8, 4)
    lengths = torch.tensor([5, 2, 0])
    clean = run(op, pred, target, lengths)
    poisoned = target.clone()
    poisoned[0, 5:] = value
    poisoned[1, 2:, 1] = value
    poisoned[2] = value
    perm = run(op, pred, poisoned, lengths)
    if op == "greedy_match":
        assert torch.equal(perm, clean)
    else:
        assert torch.equal(cost(pred, target, perm), cost(pred, target, clean))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("metric", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("case", ["nan_pred_row", "inf_pred_element", "nan_target_row", "all_pred_nan", "inf_column"])
def test_non_finite_values_still_give_a_valid_matching_on_every_backend(backend, op, metric, case):
    # A NaN distance counts as +inf (every valid row is still matched, to distinct rows), and the
    # backends agree: greedy bit for bit; optimal on which rows are matched.
    pred, target = grid_inputs(3, 7, 4)
    {
        "nan_pred_row": lambda: pred[0, 2].fill_(math.nan),
        "inf_pred_element": lambda: pred[1, 3, 1].fill_(math.inf),
        "nan_target_row": lambda: target[0, 1].fill_(math.nan),
        "all_pred_nan": lambda: pred[2].fill_(math.nan),
        "inf_column": lambda: pred[:, :, 0].fill_(math.inf),
    }[case]()
    lengths = torch.tensor([7, 4, 5])
    perm = run(op, pred, target, lengths, metric)
    assert_valid_perm(perm, lengths, 7)
    if op == "greedy_match":
        assert torch.equal(perm, reference.greedy_match(pred, target, lengths, metric))
    if case == "nan_pred_row" and op == "greedy_match" and metric != "cosine":
        assert perm[0, 0] == 2  # right to left, the NaN row (as +inf) is left for the last text row


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0, 5, 3), (3, 0, 3), (3, 5, 0), (0, 0, 0)])
def test_every_empty_dimension(backend, op, shape):
    B, N, D = shape
    pred, target = torch.randn(B, N, D), torch.randn(B, N, D)
    lengths = torch.full((B,), N, dtype=torch.int64)
    perm = run(op, pred, target, lengths)
    assert perm.shape == (B, N) and perm.dtype == torch.int64
    assert_valid_perm(perm, lengths, N)
    if D == 0 and op == "greedy_match" and B * N:  # every distance 0: right to left, smallest index first
        assert perm[0].tolist() == list(range(N - 1, -1, -1))
    assert torch.equal(run(op, pred, target, torch.zeros(B, dtype=torch.int32)), torch.full((B, N), -1))


def _bad(pred=None, target=None, lengths=None, metric="l1", **kwargs):
    good_pred = torch.randn(2, 3, 4)
    return dict(pred=good_pred if pred is None else pred, target=good_pred.clone() if target is None else target,
                lengths=torch.tensor([3, 1]) if lengths is None else lengths, metric=metric, **kwargs)


BAD_ARGUMENTS = [
    # (arguments, error, words the message must hold: the argument, what it must be, what it got)
    (_bad(pred=[[1.0]]), TypeError, ["pred", "torch.Tensor", "list"]),
    (_bad(target=None, lengths=(3, 1)), TypeError, ["lengths", "torch.Tensor", "tuple"]),
    (_bad(pred=torch.randn(2, 3)), ValueError, ["pred", "[B, N, D]", "(2, 3)"]),
    (_bad(target=torch.randn(2, 4, 4)), ValueError, ["target", "(2, 3, 4)", "(2, 4, 4)"]),
    (_bad(lengths=torch.tensor([3])), ValueError, ["lengths", "(2,)", "(1,)"]),
    (_bad(lengths=torch.tensor([[3, 1]])), ValueError, ["lengths", "(2,)", "(1, 2)"]),
    (_bad(lengths=torch.tensor([3.0, 1.0])), TypeError, ["lengths", "int32 or int64", "torch.float32"]),
    (_bad(lengths=torch.tensor([4, 1])), ValueError, ["lengths", "[0, 3]", "[1, 4]"]),
    (_bad(lengths=torch.tensor([-1, 1])), ValueError, ["lengths", "[0, 3]", "[-1, 1]"]),
    (_bad(metric="L1"), ValueError, ["metric", "'l1', 'l2', 'cosine'", "'L1'"]),
    (_bad(metric=None), ValueError, ["metric", "None"]),
    (_bad(pred=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, ["pred", "float32, float16 or bfloat16", "torch.int32"]),
    (_bad(pred=torch.ones(2, 3, 4, dtype=torch.bool)), TypeError, ["pred", "torch.bool"]),
    (_bad(target=torch.ones(2, 3, 4, dtype=torch.complex64)), TypeError, ["target", "torch.complex64"]),
    (_bad(target=torch.randn(2, 3, 4, device="meta")), ValueError, ["one device", "cpu", "meta"]),
    (_bad(lengths=torch.tensor([3, 1], device="meta")), ValueError, ["one device", "meta"]),
]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("args, error, words", BAD_ARGUMENTS, ids=range(len(BAD_ARGUMENTS)))
def test_bad_arguments_give_a_clear_error_naming_them(backend, op, args, error, words):
    with pytest.raises(error) as info:
        run(op, **args)
    message = str(info.value)
    assert message.startswith(f"{op}:"), message
    for word in words:
        assert word in message, (word, message)
