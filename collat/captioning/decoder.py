"""The captioning decoder of paper section 5.3: one pre-norm transformer decoder layer over word
embeddings that cross-attends to a frozen CoLLAT's per-token outputs (conditioning(audio) by default,
or h_at), trained with teacher forcing; greedy and beam-search decoding; saving and loading.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from collat.captioning.vocab import Vocabulary


@dataclass
class CaptionerConfig:
    memory_dim: int  # width W of the frozen model's output tokens
    memory_len: int  # number N of those tokens
    vocab_size: int
    dim: int = 256
    num_heads: int = 4
    ff_dim: int = 1024
    dropout: float = 0.1
    max_words: int = 30  # longest caption, in words (without <bos>/<eos>)


class CaptionDecoder(nn.Module):
    """One pre-norm transformer decoder layer over word embeddings, cross-attending to the memory."""

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.dim)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_words + 2, config.dim))
        self.memory_norm = nn.LayerNorm(config.memory_dim)
        self.memory_proj = nn.Linear(config.memory_dim, config.dim)
        self.memory_position = nn.Parameter(torch.zeros(config.memory_len, config.dim))
        self.layer = nn.TransformerDecoderLayer(
            config.dim, config.num_heads, config.ff_dim, config.dropout, batch_first=True, norm_first=True
        )
        self.norm_out = nn.LayerNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab_size)
        nn.init.normal_(self.position_embedding, std=0.02)
        nn.init.normal_(self.memory_position, std=0.02)

    def encode_memory(self, memory: torch.Tensor) -> torch.Tensor:
        if memory.dim() != 3 or memory.shape[1:] != (self.config.memory_len, self.config.memory_dim):
            raise ValueError(
                f"memory must be [B, {self.config.memory_len}, {self.config.memory_dim}], got {tuple(memory.shape)}"
            )
        return self.memory_proj(self.memory_norm(memory)) + self.memory_position

    def forward(self, memory: torch.Tensor, tokens: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """memory [B, N, W] frozen features; tokens [B, L] starting with <bos> -> next-word logits [B, L, V]."""
        return self.decode(self.encode_memory(memory), tokens, pad_id)

    def decode(self, memory: torch.Tensor, tokens: torch.Tensor, pad_id: int | None = None) -> torch.Tensor:
        """Like forward, with the memory already passed through encode_memory (decoding reuses it)."""
        length = tokens.shape[1]
        if length > self.position_embedding.shape[0]:
            raise ValueError(f"token sequence of length {length} exceeds max_words + 2 = {self.position_embedding.shape[0]}")
        x = self.token_embedding(tokens) + self.position_embedding[:length]
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)  # True = masked
        padding = (tokens == pad_id) if pad_id is not None else None
        x = self.layer(x, memory, tgt_mask=causal, tgt_is_causal=True, tgt_key_padding_mask=padding)
        return self.lm_head(self.norm_out(x))

    def _next_word_log_probs(self, encoded, tokens, vocab: Vocabulary, last_step: bool) -> torch.Tensor:
        """log p(next word) with <pad>/<bos> banned; at the last allowed step only <eos> remains."""
        log_probs = F.log_softmax(self.decode(encoded, tokens)[:, -1].float(), -1)
        banned = torch.zeros(log_probs.shape[-1], dtype=torch.bool, device=log_probs.device)
        if last_step:
            banned[:] = True
            banned[vocab.eos_id] = False
        else:
            banned[[vocab.pad_id, vocab.bos_id]] = True
        return log_probs.masked_fill(banned, float("-inf"))

    def _word_budget(self, max_words: int | None) -> int:
        if max_words is not None and max_words < 0:
            raise ValueError(f"max_words must be >= 0, got {max_words}")
        return self.config.max_words if max_words is None else min(max_words, self.config.max_words)

    @torch.no_grad()
    def greedy(self, memory: torch.Tensor, vocab: Vocabulary, max_words: int | None = None) -> list[list[int]]:
        """Most likely next word at every step; returns word ids (no <bos>/<eos>) per clip."""
        max_words = self._word_budget(max_words)
        encoded = self.encode_memory(memory)
        tokens = torch.full((memory.shape[0], 1), vocab.bos_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(memory.shape[0], dtype=torch.bool, device=memory.device)
        for step in range(max_words + 1):
            next_token = self._next_word_log_probs(encoded, tokens, vocab, step == max_words).argmax(-1)
            next_token = torch.where(done, torch.full_like(next_token, vocab.pad_id), next_token)
            tokens = torch.cat([tokens, next_token[:, None]], 1)
            done |= next_token == vocab.eos_id
            if done.all():
                break
        return [_strip(row, vocab) for row in tokens[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(
        self, memory: torch.Tensor, vocab: Vocabulary, beam_size: int = 3, max_words: int | None = None,
        length_penalty: float = 0.0,
    ) -> list[list[int]]:
        """Beam search; the final beam is chosen by log p / (length ** length_penalty), length in words + <eos>.

        Captions end with <eos> after at most max_words words; beam_size=1 is greedy decoding.
        """
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        max_words = self._word_budget(max_words)
        batch, vocab_size = memory.shape[0], len(vocab)
        encoded = self.encode_memory(memory).repeat_interleave(beam_size, 0)
        tokens = torch.full((batch * beam_size, 1), vocab.bos_id, dtype=torch.long, device=memory.device)
        scores = torch.full((batch, beam_size), float("-inf"), device=memory.device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        finished = torch.zeros(batch, beam_size, dtype=torch.bool, device=memory.device)
        # A finished beam may only continue with <pad> at no cost, so it keeps its score.
        frozen = torch.full((vocab_size,), float("-inf"), device=memory.device)
        frozen[vocab.pad_id] = 0.0
        for step in range(max_words + 1):
            log_probs = self._next_word_log_probs(encoded, tokens, vocab, step == max_words)
            log_probs = torch.where(finished[..., None], frozen, log_probs.view(batch, beam_size, vocab_size))
            candidates = (scores[..., None] + log_probs).view(batch, -1)
            scores, flat = candidates.topk(beam_size, dim=-1)
            parent, word = flat // vocab_size, flat % vocab_size
            rows = (torch.arange(batch, device=memory.device)[:, None] * beam_size + parent).view(-1)
            tokens = torch.cat([tokens[rows], word.view(-1, 1)], 1)
            finished = finished.gather(1, parent) | (word == vocab.eos_id)
            if finished.all():
                break
        lengths = (tokens[:, 1:] != vocab.pad_id).sum(1).view(batch, beam_size).clamp(min=1).float()
        best = (scores / lengths.pow(length_penalty)).argmax(-1)
        chosen = tokens.view(batch, beam_size, -1)[torch.arange(batch), best, 1:]
        return [_strip(row, vocab) for row in chosen.tolist()]


def _strip(ids: list[int], vocab: Vocabulary) -> list[int]:
    out = []
    for i in ids:
        if i == vocab.eos_id:
            break
        if i not in (vocab.pad_id, vocab.bos_id):
            out.append(i)
    return out


def sequence_log_prob(decoder: CaptionDecoder, memory: torch.Tensor, words: list[list[int]], vocab: Vocabulary) -> torch.Tensor:
    """log p(words + <eos> | memory) for each clip: the quantity greedy and beam search maximise."""
    batch = _pad_batch([[vocab.bos_id] + w + [vocab.eos_id] for w in words], vocab.pad_id).to(memory.device)
    with torch.no_grad():
        log_probs = F.log_softmax(decoder(memory, batch[:, :-1], vocab.pad_id).float(), -1)
    target = batch[:, 1:]
    picked = log_probs.gather(-1, target[..., None]).squeeze(-1)
    return (picked * (target != vocab.pad_id)).sum(1)


def _pad_batch(sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences], dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Training, saving, loading
# ----------------------------------------------------------------------------------------------


@dataclass
class CaptionTraining:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.01
    seed: int = 0


def train_captioner(
    memory: torch.Tensor,
    captions: Sequence[Sequence[str]],
    vocab: Vocabulary,
    config: CaptionerConfig,
    training: CaptionTraining = CaptionTraining(),
    log=None,
) -> tuple[CaptionDecoder, list[float]]:
    """Teacher-forced cross-entropy on every (clip, caption) pair. memory: [C, N, W] frozen features;
    captions[c]: the captions of clip c. Returns the decoder (eval mode) and the mean loss per epoch."""
    if memory.shape[0] != len(captions):
        raise ValueError(f"memory has {memory.shape[0]} clips but captions has {len(captions)}")
    pairs = [(c, vocab.encode(text, config.max_words)) for c, texts in enumerate(captions) for text in texts]
    if not pairs:
        raise ValueError("no training captions")
    # Seeded by training.seed without touching the caller's global RNG state.
    with torch.random.fork_rng(devices=[memory.device.index or 0] if memory.device.type == "cuda" else []):
        torch.manual_seed(training.seed)
        return _train(memory, pairs, vocab, config, training, log)


def _train(memory, pairs, vocab, config, training, log):
    decoder = CaptionDecoder(config).to(memory.device)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    generator = torch.Generator().manual_seed(training.seed)
    history = []
    decoder.train()
    for epoch in range(training.epochs):
        order = torch.randperm(len(pairs), generator=generator).tolist()
        total, count = 0.0, 0
        for start in range(0, len(order), training.batch_size):
            chunk = [pairs[i] for i in order[start : start + training.batch_size]]
            clip_index = torch.tensor([c for c, _ in chunk], device=memory.device)
            tokens = _pad_batch([ids for _, ids in chunk], vocab.pad_id).to(memory.device)
            logits = decoder(memory[clip_index], tokens[:, :-1], vocab.pad_id)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1), ignore_index=vocab.pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(decoder.parameters(), 1.0)
            optimizer.step()
            total += loss.item() * len(chunk)
            count += len(chunk)
        history.append(total / count)
        if log is not None:
            log(f"captioner epoch {epoch + 1}/{training.epochs}: loss {history[-1]:.4f}")
    decoder.eval()
    return decoder, history


def save_captioner(directory: str | Path, decoder: CaptionDecoder, vocab: Vocabulary, extra: dict | None = None) -> Path:
    """Writes captioner.safetensors + captioner.json atomically (a temporary folder renamed into place)."""
    from safetensors.torch import save_file

    from collat.fileio import atomic_directory

    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in decoder.state_dict().items()}, str(tmp / "captioner.safetensors"))
        meta = {"format": "collat-captioner", "version": 1, "config": asdict(decoder.config), "vocab": vocab.words}
        meta.update(extra or {})
        (tmp / "captioner.json").write_text(json.dumps(meta, indent=2))
    return Path(directory)


def load_captioner(directory: str | Path) -> tuple[CaptionDecoder, Vocabulary, dict]:
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path = directory / "captioner.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no captioner at {directory}: {meta_path.name} is missing")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != "collat-captioner" or meta.get("version") != 1:
        raise ValueError(f"{meta_path} is not a version-1 collat captioner (format={meta.get('format')!r}, version={meta.get('version')!r})")
    decoder = CaptionDecoder(CaptionerConfig(**meta["config"]))
    decoder.load_state_dict(load_file(str(directory / "captioner.safetensors")))
    return decoder.eval(), Vocabulary(meta["vocab"]), meta
