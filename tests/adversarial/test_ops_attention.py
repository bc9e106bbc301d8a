"""Adversarial inputs to cross_attention on every backend this machine has: the Triton kernels (run by
the interpreter on CPU, the launcher code CUDA runs), the SDPA fallback that CPU tensors take without
the interpreter, and the plain-PyTorch reference. Results are checked against the reference in
float64 on contiguous copies."""
import math

import pytest
import torch
from collat.kernels import _utils, attention

from collat.ops import reference
from collat.ops.attention import cross_attention

BACKENDS = ["triton", "sdpa", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    if request.param == "triton":
        allocate = attention._empty_in_layout_of

        def poisoned(t):  # every output and gradient buffer starts as NaN
            buffer, view = allocate(t)
            return buffer.fill_(math.nan), view

        monkeypatch.setattr(attention, "_empty_in_layout_of", poisoned)
        return cross_attention
    if request.param == "sdpa":
        monkeypatch.setattr(_utils, "INTERPRET", False)  # CPU tensors then take SDPA
        return cross_attention
    return reference.cross_attention


def fp64_reference(q, k, v, mask, grad):
    leaves = [t.detach().double().contiguous().requires_grad_() for t in (q, k, v)]
    out = reference.cross_attention(*leaves, None if mask is None else mask.contiguous())
    out.backward(grad.double())
    return out.detach(), [t.grad for t in leaves]


def run(fn, q, k, v, mask, grad):
    """fn's output and the gradients of q, k, v, with the views' own layouts (clone() would make an
    expanded view contiguous)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def check(fn, q, k, v, mask, grad, atol=5e-5):
    out, grads = run(fn, q, k, v, mask, grad)
    ref_out, ref_grads = fp64_reference(q, k, v, mask, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=1e-4)
    for name, g, ref in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), ref, atol=atol, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def tail_mask(B, NK, lengths):
    return torch.arange(NK)[None, :] >= torch.tensor(lengths)[:, None]


B, H, NQ, NK, D = 2, 2, 5, 7, 12
VIEWS = {  # name: (leaf shape for [B, H, N, D], view)
    "expand_batch": (lambda n: (1, H, n, D), lambda t, n: t.expand(B, H, n, D)),
    "expand_heads": (lambda n: (B, 1, n, D), lambda t, n: t.expand(B, H, n, D)),
    "expand_rows": (lambda n: (B, H, 1, D), lambda t, n: t.expand(B, H, n, D)),
    "expand_width": (lambda n: (B, H, n, 1), lambda t, n: t.expand(B, H, n, D)),
    "head_view": (lambda n: (B, n, H * D), lambda t, n: t.view(B, n, H, D).transpose(1, 2)),
    "transposed": (lambda n: (B, H, D, n), lambda t, n: t.transpose(2, 3)),
    "offset_strided": (lambda n: (B + 1, H, n + 1, 2 * D + 1), lambda t, n: t[1:, :, 1:, 1::2]),
}


def viewed(kind, n):
    leaf_shape, view = VIEWS[kind]
    return view(torch.randn(leaf_shape(n)), n)


@pytest.mark.parametrize("kind", VIEWS)
@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
def test_every_layout_of_every_input(backend, kind, which):
    q = viewed(kind, NQ) if which in ("q", "all") else torch.randn(B, H, NQ, D)
    k = viewed(kind, NK) if which in ("k", "all") else torch.randn(B, H, NK, D)
    v = viewed(kind, NK) if which in ("v", "all") else torch.randn(B, H, NK, D)
    check(backend, q, k, v, tail_mask(B, NK, [7, 3]), torch.randn(B, H, NQ, D))


@pytest.mark.parametrize("kind", ["expand_batch", "transposed", "offset_strided"])
def test_layouts_of_the_mask_and_the_incoming_gradient(backend, kind):
    q, k, v = torch.randn(B, H, NQ, D), torch.randn(B, H, NK, D), torch.randn(B, H, NK, D)
    mask = {
        "expand_batch": tail_mask(1, NK, [4]).expand(B, NK),
        "transposed": tail_mask(B, NK, [4, 6]).t().contiguous().t(),
        "offset_strided": tail_mask(B + 1, 2 * NK, [9, 8, 12])[1:, ::2],
    }[kind]
    grad = viewed(kind, NQ)
    check(backend, q, k, v, mask, grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_expanded_inputs(backend, dtype):
    q, k, v = (viewed("expand_batch", n).to(dtype) for n in (NQ, NK, NK))
    out, _ = run(backend, q, k, v, tail_mask(B, NK, [7, 2]), torch.randn(B, H, NQ, D).to(dtype))
    ref_out, _ = fp64_reference(q, k, v, tail_mask(B, NK, [7, 2]), torch.randn(B, H, NQ, D))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("where", ["k", "v", "both"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_padding_keys_never_reach_an_output_or_gradient(backend, where, value):
    q, k, v = torch.randn(B, H, NQ, D), torch.randn(B, H, NK, D), torch.randn(B, H, NK, D)
    mask = tail_mask(B, NK, [4, 0])  # item 1: every key is padding
    grad = torch.randn(B, H, NQ, D)
    clean_out, clean_grads = run(backend, q, k, v, mask, grad)
    k2, v2 = k.clone(), v.clone()
    for t, name in ((k2, "k"), (v2, "v")):
        if where in (name, "both"):
            t[0, :, 5] = value
            t[1, 1, 2, 3] = value
    out, grads = run(backend, q, k2, v2, mask, grad)
    assert torch.equal(out, clean_out)
    for g, clean in zip(grads, clean_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, clean, atol=1e-6, rtol=1e-5)
    assert (out[1] == 0).all()


@pytest.mark.parametrize("with_mask", [False, True])
def test_non_finite_query_and_visible_key_poison_only_what_attends_to_them(backend, with_mask):
    q, k, v = torch.randn(B, H, NQ, D), torch.randn(B, H, NK, D), torch.randn(B, H, NK, D)
    mask = tail_mask(B, NK, [5, 7]) if with_mask else None
    clean = backend(q, k, v, mask)
    bad_q = q.clone()
    bad_q[0, 1, 2, 0] = math.nan
    out = backend(bad_q, k, v, mask)
    assert out[0, 1, 2].isnan().all()
    out[0, 1, 2] = clean[0, 1, 2]
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-5)
    bad_v = v.clone()
    bad_v[1, 0, 1] = math.nan  # a visible key of item 1, head 0
    out = backend(q, k, bad_v, mask)
    assert out[1, 0].isnan().all()
    out[1, 0] = clean[1, 0]
    torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(0, 2, 5, 7), (2, 0, 5, 7), (2, 2, 0, 7), (2, 2, 5, 0), (0, 0, 0, 0)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_every_empty_dimension(backend, shape, with_mask):
    b, h, nq, nk = shape
    q, k, v = torch.randn(b, h, nq, 16), torch.randn(b, h, nk, 16), torch.randn(b, h, nk, 16)
    mask = torch.zeros(b, nk, dtype=torch.bool) if with_mask else None
    out, grads = run(backend, q, k, v, mask, torch.randn(b, h, nq, 16))
    assert out.shape == (b, h, nq, 16) and (out == 0).all()
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and (g == 0).all()


def test_a_call_interrupted_at_any_program_leaves_every_later_call_exact(interrupter):
    q, k, v = torch.randn(B, H, NQ, D), torch.randn(B, H, NK, D), torch.randn(B, H, NK, D)
    mask, grad = tail_mask(B, NK, [7, 3]), torch.randn(B, H, NQ, D)
    expected = run(cross_attention, q, k, v, mask, grad)
    with interrupter() as count:
        run(cross_attention, q, k, v, mask, grad)
    for n in range(1, count.programs + 1):
        with pytest.raises(KeyboardInterrupt), interrupter(n):
            run(cross_attention, -q, k, v, mask, -grad)
        again = run(cross_attention, q, k, v, mask, grad)
        assert torch.equal(again[0], expected[0]) and all(torch.equal(a, b) for a, b in zip(again[1], expected[1]))


def test_a_split_key_backward_interrupted_at_any_program_leaves_later_calls_exact(interrupter):
    # Key splits (the GPU's choice at the real shape): the last split of each head sums the dq parts
    # behind a per-head ticket, which an interrupted launch must not leave counted up.
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 300, 16), torch.randn(1, 2, 300, 16)
    grad = torch.randn(1, 2, 5, 16)
    out, lse = attention.attention_forward(q, k, v, None)
    config = attention.LaunchConfig(block_n=64, num_warps=4, num_stages=1, num_splits=3)
    backward = lambda g: attention.attention_backward(g, q, k, v, out, lse, None, config=config, mode="fused")  # noqa: E731
    expected = backward(grad)
    with interrupter() as count:
        backward(grad)
    assert count.programs == 6
    for n in range(1, count.programs + 1):
        with pytest.raises(KeyboardInterrupt), interrupter(n):
            backward(-grad)
        backward(2 * grad)  # a complete call with other values: stale dq parts would show below
        assert all(torch.equal(a, b) for a, b in zip(backward(grad), expected))


def _args(q=None, k=None, v=None, mask="default", **kwargs):
    args = dict(q=torch.randn(2, 3, 5, 16) if q is None else q, k=torch.randn(2, 3, 7, 16) if k is None else k)
    args["v"] = args["k"].clone() if v is None else v
    args["key_padding_mask"] = torch.zeros(2, 7, dtype=torch.bool) if isinstance(mask, str) else mask
    args.update(kwargs)
    return args


BAD_ARGUMENTS = [
    (_args(q=[[1.0]]), TypeError, ["q", "torch.Tensor", "list"]),
    (_args(q=torch.randn(3, 5, 16)), ValueError, ["q", "4-D", "(3, 5, 16)"]),
    (_args(v=torch.randn(2, 3, 7, 8)), ValueError, ["v", "(2, 3, 7, 16)", "(2, 3, 7, 8)"]),
    (_args(k=torch.randn(1, 3, 7, 16)), ValueError, ["k", "B=2", "(1, 3, 7, 16)"]),
    (_args(k=torch.randn(2, 2, 7, 16)), ValueError, ["k", "H=3", "(2, 2, 7, 16)"]),
    (_args(q=torch.randn(2, 3, 5, 16).double()), TypeError, ["q", "float32, float16 or bfloat16", "torch.float64"]),
    (_args(q=torch.ones(2, 3, 5, 16, dtype=torch.int32)), TypeError, ["q", "torch.int32"]),
    (_args(k=torch.randn(2, 3, 7, 16).half()), TypeError, ["k", "q's dtype torch.float32", "torch.float16"]),
    (_args(q=torch.randn(2, 3, 5, 0), k=torch.randn(2, 3, 7, 0)), ValueError, ["head dim d", "1..128", "d=0"]),
    (_args(q=torch.randn(2, 3, 5, 129), k=torch.randn(2, 3, 7, 129)), ValueError, ["head dim d", "d=129"]),
    (_args(mask=torch.zeros(2, 7)), TypeError, ["key_padding_mask", "torch.bool", "torch.float32"]),
    (_args(mask=torch.zeros(2, 6, dtype=torch.bool)), ValueError, ["key_padding_mask", "(2, 7)", "(2, 6)"]),
    (_args(mask=[[False] * 7] * 2), TypeError, ["key_padding_mask", "torch.Tensor or None", "list"]),
    (_args(k=torch.randn(2, 3, 7, 16, device="meta")), ValueError, ["k", "q's device cpu", "meta"]),
    (_args(mask=torch.zeros(2, 7, dtype=torch.bool, device="meta")), ValueError, ["key_padding_mask", "meta"]),
    (_args(fp32_precision="fp64"), ValueError, ["fp32_precision", "'ieee', 'tf32x3', 'tf32'", "'fp64'"]),
]


@pytest.mark.parametrize("front", ["triton", "sdpa"])
@pytest.mark.parametrize("args, error, words", BAD_ARGUMENTS, ids=range(len(BAD_ARGUMENTS)))
def test_bad_arguments_give_a_clear_error_naming_them(front, args, error, words, monkeypatch):
    if front == "sdpa":
        monkeypatch.setattr(_utils, "INTERPRET", False)
    with pytest.raises(error) as info:
        cross_attention(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
