"""TokenInteraction: the fused path (one K/V GEMM for all blocks with LN(a)'s affine folded in, Triton
cross-attention) computes the same function as the reference path, forward and every gradient."""
import copy

import pytest
import torch

from collat.model.interaction import TokenInteraction
from collat.ops import FUSED, op_set

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def perturbed_module(dim=48, num_queries=7, depth=2, num_heads=3, **kwargs):
    """A module whose LayerNorm affines and biases are far from their (1, 0) initialisation, so that a
    wrong fold of gamma/beta into the K/V projection cannot go unnoticed."""
    module = TokenInteraction(dim, num_queries, depth=depth, num_heads=num_heads, seed=1, **kwargs)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if "norm" in name else 0.05))
    return module.to(DEVICE)


def forward_backward(module, audio, mask):
    module.zero_grad(set_to_none=True)
    audio = audio.detach().clone().requires_grad_()
    out = module(audio, mask)
    weights = torch.linspace(-1, 1, out.shape[-1], device=out.device)
    (out * weights).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return out.detach(), audio.grad, grads


@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_matches_reference_fp32(with_mask):
    module = perturbed_module()
    audio = torch.randn(2, 33, 48, device=DEVICE)
    mask = None
    if with_mask:
        mask = torch.rand(2, 33, device=DEVICE) < 0.3
        mask[1] = True  # an item with no visible audio token
    ref_out, ref_audio_grad, ref_grads = forward_backward(module, audio, mask)
    module.ops = FUSED
    out, audio_grad, grads = forward_backward(module, audio, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(audio_grad, ref_audio_grad, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # The fold must route gradients into every block's norm_a affine.
    assert all(grads[f"blocks.{i}.norm_a.weight"].abs().sum() > 0 for i in range(2))


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def hand_written_forward(params, queries, audio, mask, depth, heads):
    """f_at of docs/design.md §1 from the raw parameters, in float64, without the module's code:
    x = N(0, 1) queries; per block x += CrossAttn(LN(x), LN(a)); x += MLP(LN(x)); then LN, Linear."""
    p = {name: t.double() for name, t in params.items()}
    a = audio.double()
    B, M, D = a.shape
    d = D // heads
    x = queries.double().expand(B, -1, -1)
    for i in range(depth):
        w = lambda name: p[f"blocks.{i}.{name}"]
        q = _layer_norm(x, w("norm_x.weight"), w("norm_x.bias")) @ w("q_proj.weight").T + w("q_proj.bias")
        kv = _layer_norm(a, w("norm_a.weight"), w("norm_a.bias")) @ w("kv_proj.weight").T + w("kv_proj.bias")
        k, v = kv[..., :D], kv[..., D:]
        out = torch.zeros_like(x)
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            scores = q[..., cols] @ k[..., cols].transpose(1, 2) / d**0.5
            if mask is not None:
                scores = scores.masked_fill(mask[:, None, :], float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an item with no visible key: zeros
            out[..., cols] = weights @ v[..., cols]
        x = x + out @ w("out_proj.weight").T + w("out_proj.bias")
        hidden = _layer_norm(x, w("norm_mlp.weight"), w("norm_mlp.bias")) @ w("fc1.weight").T + w("fc1.bias")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
        x = x + hidden @ w("fc2.weight").T + w("fc2.bias")
    return _layer_norm(x, p["norm_out.weight"], p["norm_out.bias"]) @ p["head.weight"].T + p["head.bias"]


@pytest.mark.parametrize("fused", [False, True])
def test_output_equals_a_hand_written_computation_from_the_parameters(fused):
    # Both paths against an independent computation: a wrong order of the output head (head before
    # norm_out), shared by the two paths, cannot pass here.
    module = perturbed_module(ops=op_set(fused))
    audio = torch.randn(2, 33, 48, device=DEVICE)
    mask = torch.rand(2, 33, device=DEVICE) < 0.3
    mask[1] = True
    out, audio_grad, grads = forward_backward(module, audio, mask)
    params = {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}
    audio64 = audio.double().requires_grad_()
    expected = hand_written_forward(params, module.queries, audio64, mask, depth=2, heads=3)
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=1e-5)
    (expected * torch.linspace(-1, 1, 48, device=DEVICE, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(audio_grad.double(), audio64.grad, atol=1e-5, rtol=1e-4)
    for name, p in params.items():
        torch.testing.assert_close(grads[name].double(), p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_state_dict_is_identical_and_loads_into_either():
    reference = perturbed_module()
    fused = TokenInteraction(48, 7, depth=2, num_heads=3, seed=1, ops=FUSED).to(DEVICE)
    assert fused.state_dict().keys() == reference.state_dict().keys()
    fused.load_state_dict(reference.state_dict())
    audio = torch.randn(3, 20, 48, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fused(audio), reference(audio), atol=1e-5, rtol=1e-5)
    assert fused.ops.fused and not reference.ops.fused


def test_fused_flag_can_be_flipped_after_loading():
    module = perturbed_module()
    audio = torch.randn(2, 20, 48, device=DEVICE)
    with torch.no_grad():
        ref = module(audio)
        module.ops = FUSED
        torch.testing.assert_close(module(audio), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_empty_batch(fused):
    module = perturbed_module(ops=op_set(fused))
    audio = torch.randn(0, 20, 48, device=DEVICE, requires_grad=True)
    out = module(audio, torch.zeros(0, 20, dtype=torch.bool, device=DEVICE))
    assert out.shape == (0, 7, 48)
    out.sum().backward()
    assert audio.grad.shape == audio.shape


def test_fused_under_bf16_autocast_is_close_to_reference():
    module = perturbed_module()
    audio = torch.randn(2, 33, 48, device=DEVICE)
    device_type = torch.device(DEVICE).type
    with torch.no_grad():
        exact = module(audio)
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            ref_low = module(audio).float()
            module.ops = FUSED
            fused_low = module(audio).float()
    ref_err = (ref_low - exact).abs().max().item()
    fused_err = (fused_low - exact).abs().max().item()
    assert fused_err <= 2 * ref_err + 1e-2, (fused_err, ref_err)


@pytest.mark.gpu
def test_gpu_real_module_fused_matches_reference():
    torch.manual_seed(0)
    module = TokenInteraction(512, 77, depth=8, num_heads=8).cuda()
    audio = torch.randn(8, 1212, 512, device="cuda")
    mask = torch.arange(1212, device="cuda")[None, :] >= torch.tensor([1212, 900, 1, 600, 1212, 1212, 50, 1000], device="cuda")[:, None]
    ref_out, ref_audio_grad, ref_grads = forward_backward(module, audio, mask)
    module.ops = FUSED
    out, audio_grad, grads = forward_backward(module, audio, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(audio_grad, ref_audio_grad, atol=1e-4, rtol=1e-3)
    for name in ref_grads:
        scale = ref_grads[name].abs().max().item()
        err = (grads[name] - ref_grads[name]).abs().max().item()
        assert err <= 1e-3 * scale + 1e-5, f"{name}: {err:.3g} (max |grad| {scale:.3g})"


@pytest.mark.gpu
def test_gpu_real_module_bf16_autocast():
    torch.manual_seed(0)
    module = TokenInteraction(512, 77, depth=8, num_heads=8).cuda()
    audio = torch.randn(32, 1212, 512, device="cuda")
    fused = copy.deepcopy(module)
    fused.ops = FUSED
    with torch.no_grad():
        exact = module(audio)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            ref_err = (module(audio).float() - exact).abs().max().item()
            fused_err = (fused(audio).float() - exact).abs().max().item()
    assert fused_err <= 2 * ref_err + 1e-2, (fused_err, ref_err)


@pytest.mark.gpu
def test_gpu_compiled_fused_module_matches_eager():
    torch.manual_seed(0)
    module = TokenInteraction(512, 77, depth=8, num_heads=8, ops=FUSED).cuda()
    audio = torch.randn(4, 1212, 512, device="cuda")
    eager_out, eager_audio_grad, eager_grads = forward_backward(module, audio, None)
    compiled = torch.compile(module, fullgraph=True)
    out, audio_grad, grads = forward_backward(compiled, audio, None)
    torch.testing.assert_close(out, eager_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(audio_grad, eager_audio_grad, atol=1e-4, rtol=1e-3)


def test_fused_backward_writes_every_blocks_dk_dv_into_one_buffer(monkeypatch):
    # Issue 18.5: the attention backwards write dK/dV of all blocks straight into the fused K/V
    # projection's gradient buffer; the split node hands that buffer on (no stack of 2 * depth
    # gradients). Gradients still equal the reference path's.
    from collat.model import interaction

    handed_on = []
    real_backward = interaction._SplitKeysValues.backward

    def recording_backward(ctx, *grads):
        result = real_backward(ctx, *grads)
        handed_on.append(result[0] is ctx.gradients.buffer)
        return result

    monkeypatch.setattr(interaction._SplitKeysValues, "backward", staticmethod(recording_backward))
    module = perturbed_module(depth=3)
    audio = torch.randn(2, 33, 48, device=DEVICE)
    mask = torch.rand(2, 33, device=DEVICE) < 0.3
    ref_out, ref_audio_grad, ref_grads = forward_backward(module, audio, mask)
    module.ops = FUSED
    out, audio_grad, grads = forward_backward(module, audio, mask)
    assert handed_on == [True]
    torch.testing.assert_close(audio_grad, ref_audio_grad, atol=1e-5, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_second_use_of_a_kv_slot_falls_back_to_stacking():
    # A gradient that does not come from the attention backward (here: K of block 0 also feeds a
    # second term) must not be dropped: the split node then stacks the slots' gradients.
    module = perturbed_module(ops=FUSED)
    audio = torch.randn(2, 20, 48, device=DEVICE, requires_grad=True)
    pairs, gradients = module.fused_keys_values(audio)
    x = module.initial_queries(2, audio)
    for i, (block, (k, v)) in enumerate(zip(module.blocks, pairs)):
        x = block.forward_fused(x, k, v, None, kv_gradients=(gradients, 2 * i, 2 * i + 1))
    (x.sum() + pairs[0][0].sum()).backward()
    fused_grad = audio.grad.clone()
    audio.grad = None
    pairs, _ = module.fused_keys_values(audio)
    x = module.initial_queries(2, audio)
    for block, (k, v) in zip(module.blocks, pairs):
        x = block.forward_fused(x, k, v, None)  # no kv_gradients: plain stacking
    (x.sum() + pairs[0][0].sum()).backward()
    torch.testing.assert_close(fused_grad, audio.grad, atol=1e-6, rtol=1e-5)
