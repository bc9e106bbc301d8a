"""Token interaction module f_at (paper Fig. 3b, DESIGN.md section 1).

N query vectors drawn from N(0, 1) attend to the projected audio tokens through `depth` blocks of
    x = x + CrossAttn(LN(x), LN(a));  x = x + MLP(LN(x))
followed by an output head LN + Linear. The output h_at [B, N, D] lives in the text encoder's
token-embedding space.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from collat import reference


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
        attn = reference.cross_attention(q, self.split_heads(k), self.split_heads(v), key_padding_mask)
        x = x + self.out_proj(self.merge_heads(attn))
        return x + self.mlp(x)


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
    ):
        super().__init__()
        self.dim, self.num_queries, self.depth = dim, num_queries, depth
        self.resample_queries = resample_queries
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

    def forward(self, audio_tokens: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.initial_queries(audio_tokens.shape[0], audio_tokens)
        for block in self.blocks:
            x = block(x, audio_tokens, key_padding_mask)
        return self.head(self.norm_out(x))
