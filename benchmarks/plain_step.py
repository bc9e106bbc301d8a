"""The docs/design.md §4 anchor: one CoLLAT training step as a user would write it by hand in plain
PyTorch, from precomputed fbanks, with nothing from collat.

    AST (transformers.ASTModel, SDPA attention) -> Linear to the text width
    the token interaction module: N(0, 1) queries, `depth` blocks of
        x = x + CrossAttn(LN(x), LN(a)); x = x + MLP(LN(x)), then LN + Linear (F.scaled_dot_product_attention)
    the locked CLIP text tower of open_clip (random weights: no download)
    L_ct after greedy right-to-left matching (cdist + a loop of N argmin steps),
    L_cg (symmetric cross-entropy, clamped logit scale), L_ut (noise on the fbank, as the package does)
    AdamW (fused on CUDA); the caller wraps the step in bf16 autocast.

The benchmark times it beside the package's steps on the same sizes; it shares no code with them,
so that it measures what hand-written PyTorch costs.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm_x, self.norm_a, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x, a):
        B, N, D = x.shape
        heads = lambda t: t.view(B, -1, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        q = heads(self.q(self.norm_x(x)))
        k, v = (heads(t) for t in self.kv(self.norm_a(a)).chunk(2, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)
        x = x + self.out(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm_mlp(x))))


class PlainCoLLAT(nn.Module):
    def __init__(self, ast_size: tuple[int, int, int], frames: int, patch_stride: int, depth: int, heads: int,
                 clip_model: str = "ViT-B-32"):
        super().__init__()
        import open_clip
        from transformers import ASTConfig, ASTModel

        hidden, layers, ast_heads = ast_size
        config = ASTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=ast_heads,
                           intermediate_size=4 * hidden, patch_size=16, frequency_stride=patch_stride,
                           time_stride=patch_stride, num_mel_bins=128, max_length=frames)
        self.ast = ASTModel._from_config(config, attn_implementation="sdpa")
        previous = logging.root.level
        logging.root.setLevel(logging.ERROR)  # random weights on purpose: no "no pretrained weights" warning
        try:
            clip = open_clip.create_model(clip_model)
        finally:
            logging.root.setLevel(previous)
        self.token_embedding, self.transformer, self.ln_final = clip.token_embedding, clip.transformer, clip.ln_final
        self.register_buffer("positional_embedding", clip.positional_embedding.detach().clone())
        self.register_buffer("text_projection", clip.text_projection.detach().clone())
        self.register_buffer("causal_mask", clip.attn_mask.clone(), persistent=False)
        for module in (self.token_embedding, self.transformer, self.ln_final):
            module.requires_grad_(False)
        width = self.token_embedding.weight.shape[1]
        self.context = self.positional_embedding.shape[0]
        self.proj = nn.Linear(hidden, width)
        self.register_buffer("queries", torch.randn(self.context, width, generator=torch.Generator().manual_seed(0)))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm_out, self.head = nn.LayerNorm(width), nn.Linear(width, width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def text_tower(self, h, pool_index):
        x = self.transformer(h + self.positional_embedding.to(h.dtype), attn_mask=self.causal_mask)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0], device=x.device), pool_index] @ self.text_projection.to(x.dtype)

    def audio_tokens(self, fbank):
        a = self.proj(self.ast(input_values=fbank).last_hidden_state[:, 2:])
        x = self.queries.to(a.dtype).expand(a.shape[0], -1, -1)
        for block in self.blocks:
            x = block(x, a)
        return self.head(self.norm_out(x))

    @staticmethod
    def greedy_match(pred, target, lengths):
        """Right to left, each valid text token takes the closest untaken predicted token (L1)."""
        B, N, _ = target.shape
        dist = torch.cdist(target.float(), pred.float(), p=1.0)
        perm = torch.full((B, N), -1, dtype=torch.long, device=target.device)
        taken = torch.zeros(B, N, dtype=torch.bool, device=target.device)
        rows = torch.arange(B, device=target.device)
        for j in range(N - 1, -1, -1):
            active = j < lengths
            best = dist[:, j].masked_fill(taken, math.inf).argmin(dim=-1)
            perm[:, j] = torch.where(active, best, perm[:, j])
            taken[rows[active], best[active]] = True
        return perm

    def losses(self, fbank, ids, lambdas=(1.0, 0.1, 0.01), noise_std=0.1):
        B = fbank.shape[0]
        noisy = fbank + noise_std * torch.randn_like(fbank)
        h_all = self.audio_tokens(torch.cat([fbank, noisy]))
        h_at = h_all[:B].float()
        with torch.no_grad():
            h_t = self.token_embedding(ids).float()
            z_t = F.normalize(self.text_tower(self.token_embedding(ids), ids.argmax(dim=-1)).float(), dim=-1)
            lengths = (ids != 0).sum(dim=1)
            perm = self.greedy_match(h_at, h_t, lengths)
        valid = perm >= 0
        matched = h_at.gather(1, perm.clamp_min(0)[..., None].expand(-1, -1, h_at.shape[-1]))
        l_ct = ((matched - h_t).abs().sum(-1) * valid).sum() / (valid.sum().clamp_min(1) * h_at.shape[-1])
        last = torch.full((B,), self.context - 1, device=fbank.device)
        z_a = F.normalize(self.text_tower(h_all[:B], last).float(), dim=-1)
        logits = self.logit_scale.clamp(max=math.log(100)).exp() * z_a @ z_t.t()
        labels = torch.arange(B, device=fbank.device)
        l_cg = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        l_ut = (h_at - h_all[B:].float()).abs().mean()
        return lambdas[0] * l_ct + lambdas[1] * l_cg + lambdas[2] * l_ut
