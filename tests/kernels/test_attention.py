"""cross_attention (kernels/attention.py) against collat.reference.cross_attention in float64.

Without a GPU the Triton kernels run in the interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1), so shapes stay small; with a GPU the same tests run on CUDA, and the
`gpu`-marked tests add the real shape (B=32, H=8, 77 queries x 1212 keys, d=64).
"""
import math

import pytest
import torch
from collat.kernels import attention

from collat.ops import attention as attention_front
from collat.ops import reference
from collat.ops.attention import cross_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, H, NQ, NK, D, dtype, device=DEVICE, scale=1.0):
    q = torch.randn(B, H, NQ, D, device=device) * scale
    k = torch.randn(B, H, NK, D, device=device) * scale
    v = torch.randn(B, H, NK, D, device=device)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def make_mask(B, NK, kind, device=DEVICE):
    if kind == "none":
        return None
    mask = torch.rand(B, NK, device=device) < 0.4
    if kind == "all_masked_item":  # batch item 0 has no visible key: its rows must be zeros
        mask[0] = True
    if kind == "tail":  # padding at the end, as when audio clips of different lengths are batched
        lengths = torch.randint(1, NK + 1, (B,), device=device)
        mask = torch.arange(NK, device=device)[None, :] >= lengths[:, None]
    return mask


def run(fn, q, k, v, mask, grad):
    """Output and (dq, dk, dv) of fn on fresh leaves made from q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, mask)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves]


def run_ours(q, k, v, mask, grad):
    return run(cross_attention, q, k, v, mask, grad)


def run_fp64_reference(q, k, v, mask, grad):
    return run(reference.cross_attention, q.double(), k.double(), v.double(), mask, grad.double())


SHAPES = [  # (B, H, Nq, Nk, d): odd lengths, Nq != Nk, non-power-of-two d
    (1, 1, 1, 1, 16),
    (2, 3, 13, 97, 16),
    (1, 1, 77, 300, 64),
    (2, 1, 77, 97, 48),
    (1, 3, 1, 300, 64),
    (2, 3, 13, 1, 64),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}q{}k{}d{}".format(*s))
@pytest.mark.parametrize("mask_kind", ["none", "all_masked_item", "tail"])
def test_fp32_matches_fp64_reference(shape, mask_kind):
    B, H, NQ, NK, D = shape
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = make_mask(B, NK, mask_kind)
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out, grads = run_ours(q, k, v, mask, grad)
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 3, 13, 97, 16), (1, 2, 77, 300, 64)], ids=lambda s: "B{}H{}q{}k{}d{}".format(*s))
def test_low_precision_within_twice_pytorch_error(dtype, shape):
    # FlashAttention's criterion: our error vs the fp64 oracle is at most ~2x the error of PyTorch's
    # own attention computed in the same low precision (plus a little absolute slack).
    B, H, NQ, NK, D = shape
    q, k, v = make_inputs(B, H, NQ, NK, D, dtype)
    mask = make_mask(B, NK, "all_masked_item")
    grad = torch.randn(B, H, NQ, D, device=DEVICE).to(dtype)
    out, grads = run_ours(q, k, v, mask, grad)
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    low_out, low_grads = run(reference.cross_attention, q, k, v, mask, grad)
    assert out.dtype == dtype
    slack = 1e-3 if dtype == torch.float16 else 8e-3
    for name, ours, ref, low in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads], [low_out, *low_grads]):
        ours_err = (ours.double() - ref).abs().max().item()
        pytorch_err = (low.double() - ref).abs().max().item()
        assert ours_err <= 2 * pytorch_err + slack, f"{name}: ours {ours_err:.3g} vs pytorch {pytorch_err:.3g}"


@pytest.mark.parametrize(
    "shape, mode, num_splits",
    [
        ((2, 3, 13, 300, 16), "fused", 2),  # key splits: dq summed over splits
        ((1, 2, 77, 300, 48), "fused", 3),  # the last split is shorter than the others
        ((2, 3, 13, 97, 16), "split", None),  # FA2's dq + dk/dv kernels
        ((1, 1, 130, 97, 16), "auto", None),  # Nq > 128 takes the split path
    ],
)
def test_backward_paths_match_reference(shape, mode, num_splits):
    B, H, NQ, NK, D = shape
    q, k, v = (t.detach() for t in make_inputs(B, H, NQ, NK, D, torch.float32))
    mask = make_mask(B, NK, "all_masked_item")
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out, lse = attention.attention_forward(q, k, v, mask)
    config = None
    if num_splits:
        config = attention.LaunchConfig(block_n=64, num_warps=4, num_stages=1, num_splits=num_splits)
    grads = attention.attention_backward(grad, q, k, v, out, lse, mask, config=config, mode=mode)
    _, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)


def test_backward_falls_back_when_a_config_does_not_fit(monkeypatch):
    # On the GPU, fp32 with 128 query rows on chip needs more shared memory than Hopper has: the
    # launcher must move on to the next config, and past the last one to the split kernels, and
    # remember that for later calls.
    from triton.runtime.errors import OutOfResources

    real_kernel = attention._attn_bwd_fused_kernel
    launched = []

    class TooBigFor32:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["BLOCK_N"] == 32 or refuse_all:
                    raise OutOfResources(300_000, 232_448, "shared memory")
                launched.append(kwargs["BLOCK_N"])
                return real_kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(attention._bwd_fused, "kernel", TooBigFor32())
    monkeypatch.setattr(attention, "_BACKWARD_FALLBACK", {})
    monkeypatch.setattr(attention, "backward_configs", lambda q: [attention.LaunchConfig(32, 4, 1), attention.LaunchConfig(64, 4, 1)])
    B, H, NQ, NK, D = 1, 2, 13, 97, 16
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    _, ref_grads = run_fp64_reference(q, k, v, None, grad)
    for refuse_all, expected_launches in ((False, [64, 64]), (True, [])):
        monkeypatch.setattr(attention, "_BACKWARD_FALLBACK", {})
        launched.clear()
        for _ in range(2):  # the second call starts from the remembered decision
            _, grads = run_ours(q, k, v, None, grad)
            for g, ref_g in zip(grads, ref_grads):
                torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)
        assert launched == expected_launches
        assert list(attention._BACKWARD_FALLBACK.values()) == [None if refuse_all else 1]


@pytest.mark.parametrize("layout_kind", ["head_view", "expand_batch", "transposed"])
def test_custom_op_passes_opcheck(layout_kind):
    # Schema, fake (meta) impl, autograd registration and AOT dispatch with dynamic shapes, on
    # strided, broadcast and transposed inputs and a mask with an all-padding item.
    B, H, NQ, NK, D = 2, 3, 13, 37, 16
    if layout_kind == "head_view":
        q = torch.randn(B, NQ, H * D, device=DEVICE).view(B, NQ, H, D).transpose(1, 2).requires_grad_()
    else:
        leaf_shape, view = layout((B, H, NQ, D), layout_kind)
        q = view(torch.randn(leaf_shape, device=DEVICE)).requires_grad_()
    _, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = make_mask(B, NK, "all_masked_item")
    torch.library.opcheck(torch.ops.collat.cross_attention_fwd.default, (q, k, v, mask, "tf32x3"))


def test_torch_compile_traces_into_the_kernels():
    # The ops are torch.library.triton_ops: the compiled graphs hold the Triton kernels themselves
    # (triton_kernel_wrapper_* nodes), not an opaque op, and give the eager results bit for bit. On
    # CPU the interpreter runs them under aot_eager: Inductor cannot compile user Triton kernels
    # without a GPU driver.
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    B, H, NQ, NK, D = 2, 3, 13, 37, 16
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = make_mask(B, NK, "all_masked_item")
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    backend = AotEagerAndRecordGraphs() if DEVICE == "cpu" else "inductor"
    compiled = torch.compile(lambda *a: cross_attention(*a) * 2, backend=backend, fullgraph=True)
    out, grads = run(compiled, q, k, v, mask, grad)
    eager_out, eager_grads = run(lambda *a: cross_attention(*a) * 2, q, k, v, mask, grad)
    torch.testing.assert_close(out, eager_out, atol=0, rtol=0)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    if DEVICE == "cpu":
        assert "triton_kernel_wrapper" in str(backend.fw_graphs[0].code)
        assert "triton_kernel_wrapper" in str(backend.bw_graphs[0].code)


def test_fully_masked_rows_give_zeros_and_zero_grads():
    B, H, NQ, NK, D = 2, 2, 13, 97, 16
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = torch.zeros(B, NK, dtype=torch.bool, device=DEVICE)
    mask[1] = True
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out, (dq, dk, dv) = run_ours(q, k, v, mask, grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in (dq, dk, dv))
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
    assert out[0].abs().sum() > 0


def test_masked_keys_get_zero_grads_and_do_not_change_the_output():
    B, H, NQ, NK, D = 1, 2, 13, 97, 16
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = torch.zeros(B, NK, dtype=torch.bool, device=DEVICE)
    mask[:, 40:] = True
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out, (_, dk, dv) = run_ours(q, k, v, mask, grad)
    assert (dk[:, :, 40:] == 0).all() and (dv[:, :, 40:] == 0).all()
    # Same result as attending over the unpadded keys only.
    short_out, _ = run_ours(q, k[:, :, :40], v[:, :, :40], None, grad)
    torch.testing.assert_close(out, short_out, atol=1e-6, rtol=1e-5)


def poisoned(buffer, view):
    buffer.fill_(float("nan"))
    return buffer, view


def test_poisoned_buffers_are_fully_overwritten(monkeypatch):
    # Every buffer the launchers allocate starts as NaN: any element a kernel forgets to write shows up.
    allocate = attention._empty_in_layout_of
    monkeypatch.setattr(attention, "_empty_in_layout_of", lambda t: poisoned(*allocate(t)))
    empty = torch.empty
    monkeypatch.setattr(attention.torch, "empty", lambda *a, **kw: empty(*a, **kw).fill_(float("nan")))
    empty_like = torch.empty_like
    monkeypatch.setattr(attention.torch, "empty_like", lambda *a, **kw: empty_like(*a, **kw).fill_(float("nan")))
    B, H, NQ, NK, D = 2, 3, 13, 97, 48
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = make_mask(B, NK, "all_masked_item")
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out, grads = run_ours(q, k, v, mask, grad)
    monkeypatch.undo()
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)


def test_strided_head_views_are_read_in_place():
    # The interaction module passes [B, N, H, d] buffers viewed as [B, H, N, d], K and V sliced out of
    # one wide projection; the result must equal the contiguous computation, and the output keeps q's
    # [B, N, H, d] memory order so that merging heads is free.
    B, H, NQ, NK, D = 2, 3, 13, 97, 16
    q = torch.randn(B, NQ, H * D, device=DEVICE).view(B, NQ, H, D).transpose(1, 2).requires_grad_()
    kv = torch.randn(B, NK, 4 * H * D, device=DEVICE)
    k = kv[..., H * D : 2 * H * D].view(B, NK, H, D).transpose(1, 2).requires_grad_()
    v = kv[..., 3 * H * D :].view(B, NK, H, D).transpose(1, 2).requires_grad_()
    mask = make_mask(B, NK, "tail")
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out = cross_attention(q, k, v, mask)
    assert out.transpose(1, 2).is_contiguous()
    out.backward(grad)
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for g, ref_g in zip((q.grad, k.grad, v.grad), ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)


def test_non_contiguous_grad_output():
    B, H, NQ, NK, D = 1, 2, 13, 97, 16
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    grad = torch.randn(B, H, D, NQ, device=DEVICE).transpose(2, 3)  # last-dim stride != 1
    out, grads = run_ours(q, k, v, None, grad)
    _, ref_grads = run_fp64_reference(q, k, v, None, grad)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("shape", [(0, 2, 13, 97, 16), (2, 0, 13, 97, 16), (2, 2, 0, 97, 16)])
def test_empty_batch_heads_or_queries(shape):
    B, H, NQ, NK, D = shape
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32)
    mask = torch.zeros(B, NK, dtype=torch.bool, device=DEVICE)
    out = cross_attention(q, k, v, mask)
    assert out.shape == (B, H, NQ, D)
    out.sum().backward()
    assert q.grad.shape == q.shape and (k.grad == 0).all() and (v.grad == 0).all()


def test_no_keys_gives_zeros():
    q, k, v = make_inputs(2, 2, 13, 0, 16, torch.float32)
    out = cross_attention(q, k, v)
    assert out.shape == (2, 2, 13, 16) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_cpu_fallback_matches_reference():
    # CPU tensors outside the interpreter use SDPA; all-masked rows must still be zeros, not NaN.
    B, H, NQ, NK, D = 2, 3, 13, 97, 48
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float64, device="cpu")
    mask = make_mask(B, NK, "all_masked_item", device="cpu")
    grad = torch.randn(B, H, NQ, D, dtype=torch.float64)
    out, grads = run(attention_front._sdpa_fallback, q, k, v, mask, grad)
    ref_out, ref_grads = run(reference.cross_attention, q, k, v, mask, grad)
    torch.testing.assert_close(out, ref_out)
    assert (out[0] == 0).all()
    for g, ref_g in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, ref_g)
    no_mask_out, _ = run(attention_front._sdpa_fallback, q, k, v, None, grad)
    torch.testing.assert_close(no_mask_out, reference.cross_attention(q, k, v))


def _valid():
    q = torch.randn(2, 3, 5, 16)
    k = torch.randn(2, 3, 7, 16)
    return q, k, k.clone()


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda q, k, v, m: (q.numpy(), k, v, m), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, r"q must be 4-D .* got shape \(3, 5, 16\)"),
        (lambda q, k, v, m: (q, k, v[..., :8], m), ValueError, r"v must have k's shape \(2, 3, 7, 16\), got \(2, 3, 7, 8\)"),
        (lambda q, k, v, m: (q, k[:1], v[:1], m), ValueError, r"k must be \[B=2, H=3, Nk, d=16\]"),
        (lambda q, k, v, m: (q, k[:, :2], v[:, :2], m), ValueError, r"k must be \[B=2, H=3"),
        (lambda q, k, v, m: (q, k[..., :8], v[..., :8], m), ValueError, r"k must be \[B=2, H=3, Nk, d=16\]"),
        (lambda q, k, v, m: (q.double(), k.double(), v.double(), m), TypeError, "q must be float32, float16 or bfloat16, got torch.float64"),
        (lambda q, k, v, m: (q, k.half(), v, m), TypeError, "k must have q's dtype torch.float32, got torch.float16"),
        (lambda q, k, v, m: (q, k, v.bfloat16(), m), TypeError, "v must have q's dtype"),
        (lambda q, k, v, m: (q.new_zeros(2, 3, 5, 160), k.new_zeros(2, 3, 7, 160), v.new_zeros(2, 3, 7, 160), m), ValueError, r"head dim d must be in 1..128, got d=160"),
        (lambda q, k, v, m: (q, k, v, m, "fp64"), ValueError, "fp32_precision must be one of .* got 'fp64'"),
        (lambda q, k, v, m: (q, k, v, m.int()), TypeError, "key_padding_mask must be torch.bool .* got torch.int32"),
        (lambda q, k, v, m: (q, k, v, m[:, :6]), ValueError, r"key_padding_mask must have shape \[B, Nk\] = \(2, 7\), got \(2, 6\)"),
        (lambda q, k, v, m: (q, k, v, m[None]), ValueError, r"key_padding_mask must have shape"),
        (lambda q, k, v, m: (q, k, v, [[False] * 7] * 2), TypeError, "key_padding_mask must be a torch.Tensor or None, got list"),
        (lambda q, k, v, m: (q, k.to("meta"), v.to("meta"), m), ValueError, "k must be on q's device cpu, got meta"),
        (lambda q, k, v, m: (q, k, v, m.to("meta")), ValueError, "key_padding_mask must be on q's device cpu, got meta"),
    ],
)
def test_validation_errors(change, error, pattern):
    q, k, v = _valid()
    mask = torch.zeros(2, 7, dtype=torch.bool)
    args = change(q, k, v, mask)
    kwargs = {"fp32_precision": args[4]} if len(args) > 4 else {}
    with pytest.raises(error, match=pattern):
        cross_attention(*args[:4], **kwargs)


# ------------------------------------------------------------------------------------------------
# GPU: the real shape (B=32, H=8, 77 queries x 1212 keys, d=64); run by the lead on an H100/H200.
# ------------------------------------------------------------------------------------------------

REAL = (32, 8, 77, 1212, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("mask_kind", ["none", "all_masked_item", "tail"])
def test_gpu_real_shape_fp32(mask_kind):
    B, H, NQ, NK, D = REAL
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32, device="cuda")
    mask = make_mask(B, NK, mask_kind, device="cuda")
    grad = torch.randn(B, H, NQ, D, device="cuda")
    out, grads = run_ours(q, k, v, mask, grad)
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["none", "all_masked_item"])
def test_gpu_real_shape_low_precision(dtype, mask_kind):
    B, H, NQ, NK, D = REAL
    # Sharper logits (scale 2) than unit normals, so that the softmax is not nearly uniform.
    q, k, v = make_inputs(B, H, NQ, NK, D, dtype, device="cuda", scale=2.0)
    mask = make_mask(B, NK, mask_kind, device="cuda")
    grad = torch.randn(B, H, NQ, D, device="cuda").to(dtype)
    out, grads = run_ours(q, k, v, mask, grad)
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    low_out, low_grads = run(reference.cross_attention, q, k, v, mask, grad)
    for name, ours, ref, low in zip(["out", "dq", "dk", "dv"], [out, *grads], [ref_out, *ref_grads], [low_out, *low_grads]):
        assert torch.isfinite(ours).all(), name
        ours_err = (ours.double() - ref).abs().max().item()
        pytorch_err = (low.double() - ref).abs().max().item()
        assert ours_err <= 2 * pytorch_err + 1e-3, f"{name}: ours {ours_err:.3g} vs pytorch {pytorch_err:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
def test_gpu_fp32_precisions_match_fp64(precision):
    B, H, NQ, NK, D = REAL
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32, device="cuda")
    mask = make_mask(B, NK, "tail", device="cuda")
    grad = torch.randn(B, H, NQ, D, device="cuda")
    out, grads = run(lambda *a: cross_attention(*a, fp32_precision=precision), q, k, v, mask, grad)
    ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)


@pytest.mark.gpu
def test_gpu_tf32_opt_in_is_close():
    B, H, NQ, NK, D = REAL
    q, k, v = (t.detach() for t in make_inputs(B, H, NQ, NK, D, torch.float32, device="cuda"))
    ref = reference.cross_attention(q.double(), k.double(), v.double())
    tf32_err = (cross_attention(q, k, v, fp32_precision="tf32").double() - ref).abs().max().item()
    assert tf32_err < 5e-3


@pytest.mark.gpu
def test_gpu_torch_compile_keeps_the_op_opaque():
    B, H, NQ, NK, D = REAL
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.bfloat16, device="cuda")
    mask = make_mask(B, NK, "tail", device="cuda")
    grad = torch.randn(B, H, NQ, D, device="cuda").to(torch.bfloat16)
    compiled = torch.compile(lambda q, k, v, m: cross_attention(q, k, v, m) * 2, fullgraph=True)
    out, grads = run(compiled, q, k, v, mask, grad)
    eager_out, eager_grads = run(lambda *a: cross_attention(*a) * 2, q, k, v, mask, grad)
    assert torch.equal(out, eager_out)
    for a, b in zip(grads, eager_grads):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    B, H, NQ, NK, D = REAL
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.bfloat16, device="cuda")
    mask = make_mask(B, NK, "tail", device="cuda")
    grad = torch.randn(B, H, NQ, D, device="cuda").to(torch.bfloat16)
    first = run_ours(q, k, v, mask, grad)
    second = run_ours(q, k, v, mask, grad)
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[1], second[1]):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_twelve_heads_head_dims_and_long_query_sets():
    for H, D, NQ in ((12, 64, 77), (8, 32, 77), (4, 128, 77), (8, 48, 77), (2, 64, 300), (2, 16, 128)):
        q, k, v = make_inputs(4, H, NQ, 1212, D, torch.float32, device="cuda")
        mask = make_mask(4, 1212, "tail", device="cuda")
        grad = torch.randn(4, H, NQ, D, device="cuda")
        out, grads = run_ours(q, k, v, mask, grad)
        ref_out, ref_grads = run_fp64_reference(q, k, v, mask, grad)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=1e-4)
        for g, ref_g in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), ref_g, atol=5e-5, rtol=1e-4)


def test_sm_scale_matches_definition():
    # One key per row: the output is that key's value whatever the scale; two keys check 1/sqrt(d).
    q = torch.ones(1, 1, 1, 16, device=DEVICE)
    k = torch.stack([torch.zeros(16), torch.ones(16)])[None, None].to(DEVICE)
    v = torch.stack([torch.zeros(16), torch.ones(16)])[None, None].to(DEVICE)
    out = cross_attention(q, k, v)
    weight = math.exp(16 / 4) / (1 + math.exp(16 / 4))
    torch.testing.assert_close(out, torch.full_like(out, weight))


def layout(shape, kind):
    """(shape of a leaf, a function viewing the leaf as `shape` [B, H, N, d] with the given layout)."""
    B, H, N, D = shape
    return {
        "contiguous": ((B, H, N, D), lambda t: t),
        "expand_batch": ((1, H, N, D), lambda t: t.expand(B, H, N, D)),  # stride 0 over B
        "expand_batch_and_heads": ((1, 1, N, D), lambda t: t.expand(B, H, N, D)),  # stride 0 over B and H
        "expand_rows": ((B, H, 1, D), lambda t: t.expand(B, H, N, D)),  # stride 0 over N
        "transposed": ((B, H, D, N), lambda t: t.transpose(2, 3)),  # last-dim stride != 1
        "offset": ((B + 1, H, N + 2, D + 3), lambda t: t[1:, :, 2:, 3:]),  # starts inside its storage
    }[kind]


LAYOUTS = ["contiguous", "expand_batch", "expand_batch_and_heads", "expand_rows", "transposed", "offset"]


@pytest.mark.parametrize("which", ["q", "k", "v", "kv"])
@pytest.mark.parametrize("kind", LAYOUTS[1:])
def test_every_input_layout_gives_the_contiguous_result(which, kind, monkeypatch):
    # Issue 17.1: stride-0 inputs made the launcher allocate out/dq/dk/dv with a last-dim stride != 1,
    # which the kernels do not support (outputs off by up to 1e28). Buffers start as NaN.
    allocate = attention._empty_in_layout_of
    monkeypatch.setattr(attention, "_empty_in_layout_of", lambda t: poisoned(*allocate(t)))
    B, H, NQ, NK, D = 2, 2, 5, 7, 16
    leaves, views = {}, {}
    for name, n in (("q", NQ), ("k", NK), ("v", NK)):
        leaf_shape, views[name] = layout((B, H, n, D), kind if name in which else "contiguous")
        leaves[name] = torch.randn(leaf_shape, device=DEVICE, requires_grad=True)
    mask = make_mask(B, NK, "tail")
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out = cross_attention(*(views[n](leaves[n]) for n in "qkv"), mask)
    out.backward(grad)
    ours = [out.detach()] + [leaves[n].grad for n in "qkv"]
    doubles = {n: leaves[n].detach().double().requires_grad_() for n in "qkv"}
    ref_out = reference.cross_attention(*(views[n](doubles[n]) for n in "qkv"), mask)
    ref_out.backward(grad.double())
    refs = [ref_out.detach()] + [doubles[n].grad for n in "qkv"]
    for name, o, r in zip(["out", "dq", "dk", "dv"], ours, refs):
        assert o.shape == r.shape, name
        torch.testing.assert_close(o.double(), r, atol=5e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


BACKENDS = {
    "ours": cross_attention,  # Triton (CUDA, or the interpreter on CPU)
    "sdpa_fallback": attention_front._sdpa_fallback,  # CPU tensors outside the interpreter
    "reference": reference.cross_attention,
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_padding_keys_are_ignored(backend, where, value):
    # Issue 17.2: a NaN/inf in a padding key reached the unpadded queries (SDPA fallback: through the
    # additive -inf mask; every backend: through 0 * NaN in P V and in dS K).
    fn = BACKENDS[backend]
    device = "cpu" if backend == "sdpa_fallback" else DEVICE
    B, H, NQ, NK, D = 2, 2, 5, 9, 16
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32, device=device)
    mask = torch.zeros(B, NK, dtype=torch.bool, device=device)
    mask[:, 6:] = True
    mask[1] = True  # an item with no visible key
    grad = torch.randn(B, H, NQ, D, device=device)
    clean_out, clean_grads = run(fn, q, k, v, mask, grad)
    poisoned = {"k": k.detach().clone(), "v": v.detach().clone()}
    poisoned[where][:, :, 7] = value
    poisoned[where][1, :, 2] = value  # inside the all-padding item
    out, grads = run(fn, q, poisoned["k"], poisoned["v"], mask, grad)
    torch.testing.assert_close(out, clean_out, atol=1e-6, rtol=1e-5)
    for name, g, clean in zip("qkv", grads, clean_grads):
        torch.testing.assert_close(g, clean, atol=1e-6, rtol=1e-5, msg=lambda m: f"d{name}: {m}")
        assert torch.isfinite(g).all(), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_non_finite_query_row_gives_nan_there_only(backend, with_mask):
    # Issue 17.2: SDPA's CPU kernel gave 0.0 for a NaN query row; the reference gives NaN.
    fn = BACKENDS[backend]
    device = "cpu" if backend == "sdpa_fallback" else DEVICE
    B, H, NQ, NK, D = 2, 2, 5, 9, 16
    q, k, v = (t.detach() for t in make_inputs(B, H, NQ, NK, D, torch.float32, device=device))
    mask = None
    if with_mask:
        mask = torch.zeros(B, NK, dtype=torch.bool, device=device)
        mask[0, 6:] = True
    clean = fn(q, k, v, mask)
    for value in (math.nan, math.inf):
        bad = q.clone()
        bad[0, 1, 3] = value
        out = fn(bad, k, v, mask)
        assert out[0, 1, 3].isnan().all(), (value, out[0, 1, 3])
        out[0, 1, 3] = clean[0, 1, 3]
        torch.testing.assert_close(out, clean, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 2, 5, 7, 16), (2, 0, 5, 7, 16), (2, 2, 0, 7, 16), (2, 2, 5, 0, 16), (0, 0, 0, 0, 16)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_every_empty_dimension_on_every_backend(backend, shape, with_mask):
    # Issue 17.12: H = 0 killed the process (SIGFPE inside SDPA); Nk = 0 broke the reference (amax).
    fn = BACKENDS[backend]
    device = "cpu" if backend == "sdpa_fallback" else DEVICE
    B, H, NQ, NK, D = shape
    q, k, v = make_inputs(B, H, NQ, NK, D, torch.float32, device=device)
    mask = torch.zeros(B, NK, dtype=torch.bool, device=device) if with_mask else None
    out = fn(q, k, v, mask)
    assert out.shape == (B, H, NQ, D) and (out == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.skipif(DEVICE != "cpu", reason="interrupts programs of the Triton interpreter")
@pytest.mark.parametrize("interrupt_at", [1, 2, 3])
def test_a_backward_interrupted_mid_launch_leaves_later_calls_exact(interrupt_at, interrupter):
    # With key splits, the last split of a head sums the dq parts (a per-head ticket). Ctrl-C between
    # the interpreter's programs must not leave a ticket that a later call inherits.
    B, H, NQ, NK, D = 1, 2, 5, 300, 16
    q, k, v = (t.detach() for t in make_inputs(B, H, NQ, NK, D, torch.float32))
    grad = torch.randn(B, H, NQ, D, device=DEVICE)
    out, lse = attention.attention_forward(q, k, v, None)
    config = attention.LaunchConfig(block_n=64, num_warps=4, num_stages=1, num_splits=3)
    expected = attention.attention_backward(grad, q, k, v, out, lse, None, config=config, mode="fused")
    with interrupter(interrupt_at), pytest.raises(KeyboardInterrupt):  # another gradient: stale dq parts would show
        attention.attention_backward(-grad, q, k, v, out, lse, None, config=config, mode="fused")
    attention.attention_backward(-grad, q, k, v, out, lse, None, config=config, mode="fused")
    for _ in range(2):
        again = attention.attention_backward(grad, q, k, v, out, lse, None, config=config, mode="fused")
        for a, b in zip(again, expected):
            assert torch.equal(a, b)
