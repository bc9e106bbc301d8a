"""Token interaction module f_at (paper Fig. 3b, docs/design.md §1).

N query vectors drawn from N(0, 1) attend to the projected audio tokens through `depth` blocks of
    x = x + CrossAttn(LN(x), LN(a));  x = x + MLP(LN(x))
followed by an output head LN + Linear. The output h_at [B, N, D] lives in the text encoder's
token-embedding space.

Two paths share one parameter layout (a state_dict loads into either), chosen by the op set `ops`
(collat.ops.FUSED or REFERENCE, a plain attribute that can be swapped at any time):
- reference: each block runs its own LN(a) and K/V projection and the plain-PyTorch attention;
- fused: K and V of every block depend only on `a`, and every block's LN(a) is the same plain
  normalisation n(a) followed by that block's affine (gamma_l, beta_l). Folding the affine into the
  projection, W_l (gamma_l * n + beta_l) + b_l = (W_l diag(gamma_l)) n + (W_l beta_l + b_l), turns all
  blocks' K/V into ONE GEMM over the audio tokens; attention then runs in the Triton kernel
  (collat.ops.cross_attention). The folding is differentiable, so gamma_l and beta_l
  get their gradients through it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from collat.ops import FUSED, REFERENCE, OpSet
from collat.ops.attention import KVGradients


class InteractionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim must be divisible by num_heads, got dim={dim}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm_x = nn.LayerNorm(dim)
        self.norm_a = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.kv_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, L, D = t.shape
        return t.view(B, L, self.num_heads, D // self.num_heads).transpose(1, 2)

    def merge_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, H, L, d = t.shape
        return t.transpose(1, 2).reshape(B, L, H * d)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm_mlp(x))))

    def forward(self, x: torch.Tensor, a: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.split_heads(self.q_proj(self.norm_x(x)))
        k, v = self.kv_proj(self.norm_a(a)).chunk(2, dim=-1)
        attn = REFERENCE.cross_attention(q, self.split_heads(k), self.split_heads(v), key_padding_mask)
        x = x + self.out_proj(self.merge_heads(attn))
        return x + self.mlp(x)

    def forward_fused(
        self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
        kv_gradients: tuple | None = None,
    ) -> torch.Tensor:
        """The block with K/V given ([B, M, D] each, from TokenInteraction.fused_keys_values);
        kv_gradients: (KVGradients, slot of k, slot of v), where their gradients go."""
        q = self.split_heads(self.q_proj(self.norm_x(x)))
        attn = FUSED.cross_attention(
            q, self.split_heads(k), self.split_heads(v), key_padding_mask, kv_gradients=kv_gradients
        )
        x = x + self.out_proj(self.merge_heads(attn))
        return x + self.mlp(x)

    def folded_kv_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W diag(gamma), W beta + b) of the K/V projection, in fp32: LN(a)'s affine folded in."""
        weight, bias = self.kv_proj.weight, self.kv_proj.bias
        gamma, beta = self.norm_a.weight, self.norm_a.bias
        # Elementwise + sum rather than a matmul so that autocast cannot round the fold to bf16.
        folded_bias = (weight * beta[None, :]).sum(dim=1) + bias
        return weight * gamma[None, :], folded_bias


class TokenInteraction(nn.Module):
    """f_at: audio tokens [B, M, D] (+ optional bool padding mask [B, M]) -> token embeddings [B, N, D].

    The queries are a fixed buffer drawn from N(0, 1) with `seed` (so a checkpoint reproduces them);
    with `resample_queries=True` fresh queries are drawn every training forward.
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        depth: int = 8,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        seed: int = 0,
        resample_queries: bool = False,
        ops: OpSet = REFERENCE,
    ):
        super().__init__()
        self.dim, self.num_queries, self.depth = dim, num_queries, depth
        self.resample_queries = resample_queries
        self.ops = ops
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("queries", torch.randn(num_queries, dim, generator=generator))
        self.blocks = nn.ModuleList(InteractionBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, dim)

    def initial_queries(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        if self.resample_queries and self.training:
            queries = torch.randn(self.num_queries, self.dim, device=like.device)
        else:
            queries = self.queries
        return queries.to(like.dtype).expand(batch, -1, -1)

    def fused_keys_values(self, audio_tokens: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], KVGradients]:
        """Every block's (K, V), [B, M, D] views of one [B, M, depth * 2D] projection of n(a), and the
        one gradient buffer that the blocks' attention backwards write their dK/dV into."""
        eps = {block.norm_a.eps for block in self.blocks}
        if len(eps) != 1:
            raise ValueError(f"the fused path needs one LayerNorm eps for every block's norm_a, got {sorted(eps)}")
        B, M, D = audio_tokens.shape
        normalized = F.layer_norm(audio_tokens, (D,), eps=eps.pop())
        with torch.autocast(device_type=audio_tokens.device.type, enabled=False):
            folded = [block.folded_kv_params() for block in self.blocks]
        weight = torch.cat([w for w, _ in folded])
        bias = torch.cat([b for _, b in folded])
        kv = F.linear(normalized, weight, bias).view(B, M, 2 * self.depth, D)
        gradients = KVGradients(kv)
        if torch.compiler.is_compiling():
            parts = kv.unbind(dim=2)  # the compiler plans the gradient buffers itself
        else:
            parts = _SplitKeysValues.apply(kv, gradients)
        return [(parts[2 * i], parts[2 * i + 1]) for i in range(self.depth)], gradients

    def forward(self, audio_tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.initial_queries(audio_tokens.shape[0], audio_tokens)
        if self.ops.fused and self.depth > 0:
            pairs, gradients = self.fused_keys_values(audio_tokens)
            for i, (block, (k, v)) in enumerate(zip(self.blocks, pairs)):
                x = block.forward_fused(x, k, v, key_padding_mask, kv_gradients=(gradients, 2 * i, 2 * i + 1))
        else:
            for block in self.blocks:
                x = block(x, audio_tokens, key_padding_mask)
        return self.head(self.norm_out(x))


class _SplitKeysValues(torch.autograd.Function):
    """kv [B, M, slots, D] -> its slots [B, M, D] (views). The backward hands on the KVGradients
    buffer that the attention backwards filled, without a copy; a slot whose gradient came from
    anywhere else (another backend, a second use) makes it stack the slots' gradients instead."""

    @staticmethod
    def forward(ctx, kv, gradients):
        ctx.gradients = gradients
        return kv.unbind(dim=2)

    @staticmethod
    def backward(ctx, *grads):
        gradients = ctx.gradients
        if all(gradients.holds(index, grad) for index, grad in enumerate(grads)):
            return gradients.buffer, None
        slots = [torch.zeros(gradients.shape[:2] + gradients.shape[3:], dtype=gradients.dtype, device=gradients.device)
                 if grad is None else grad for grad in grads]
        return torch.stack(slots, dim=2), None
