"""Audio captioning on a frozen CoLLAT (paper §5.3): a 1-layer transformer decoder and caption metrics.

The decoder cross-attends to the frozen model's per-token outputs — by default ``conditioning(audio)``
(the locked text encoder's last hidden states of the predicted tokens, [B, N, W]); ``h_at``
(``audio_to_text_tokens``) is the other choice — and is trained with teacher forcing on captioned
audio. Features are extracted once, so training the decoder never runs the audio encoder again.

Caption metrics follow the coco-caption code (pycocoevalcap 1.2) that the DCASE/AudioCaps
literature reports, re-implemented in pure Python:
- BLEU-1..4: corpus-level clipped n-gram counts (each n-gram's count clipped at its maximum count in
  any one reference), geometric mean of the 1..n precisions (1e-15 / 1e-9 smoothing as in coco),
  brevity penalty exp(1 - r/c) when the corpus length c is below r, where r sums, per caption, the
  reference length closest to the candidate's (ties -> the shorter).
- ROUGE-L: per caption, LCS-based precision and recall, each maximised over the references, combined
  as F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; averaged over captions.
- CIDEr-D: TF-IDF n-gram vectors (n = 1..4; IDF = log(#clips) - log(max(1, df)), df counted over the
  clips' reference sets), clipped similarity sum(min(v_c, v_r) * v_r) / (|v_c| |v_r|), Gaussian
  length penalty exp(-(l_c - l_r)^2 / (2 * 6^2)), averaged over n and references, times 10. As in
  coco's code, the "length" is the number of bigrams (words - 1 for non-empty captions).
- METEOR and SPICE need Java and the ``aac-metrics`` package (with its downloaded jars); when either
  is missing they are reported as None with the reason, never silently left out.

Tokenisation: lower-case words; punctuation is dropped (coco uses the Java PTB tokenizer, which
does the same for plain captions).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased words without punctuation: "A dog, barking!" -> ["a", "dog", "barking"]."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------


class Vocabulary:
    """Word-level vocabulary built from training captions; ids 0..3 are <pad>, <bos>, <eos>, <unk>."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if words[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            words = list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS]
        if len(set(words)) != len(words):
            raise ValueError("vocabulary words must be unique")
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[t] for t in SPECIAL_TOKENS)

    @classmethod
    def build(cls, captions: Sequence[str], min_count: int = 1) -> "Vocabulary":
        counts = Counter(word for caption in captions for word in tokenize_caption(caption))
        if not counts:
            raise ValueError("cannot build a vocabulary: the training captions contain no words")
        # Most frequent first, ties alphabetical, so the ids do not depend on caption order.
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + kept)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str, max_len: int) -> list[int]:
        """<bos> w1 .. wk <eos>, with the words cut so the whole fits in max_len + 2 ids."""
        ids = [self.index.get(w, self.unk_id) for w in tokenize_caption(caption)][:max_len]
        return [self.bos_id] + ids + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        words = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            words.append(self.words[i])
        return " ".join(words)


# ----------------------------------------------------------------------------------------------
# Caption metrics (pure Python)
# ----------------------------------------------------------------------------------------------


def _ngram_counts(words: Sequence[str], max_n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]):
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cannot score an empty set of captions")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")
    return [tokenize_caption(c) for c in candidates], [[tokenize_caption(r) for r in refs] for refs in references]


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Corpus BLEU-1..max_n as in coco-caption (module docstring). Returns [BLEU-1, ..., BLEU-max_n]."""
    cands, refs_all = _check_corpus(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * max_n, [0] * max_n
    cand_total, ref_total = 0, 0
    for cand, refs in zip(cands, refs_all):
        counts = _ngram_counts(cand, max_n)
        max_ref_counts: dict = {}
        for ref in refs:
            for ngram, c in _ngram_counts(ref, max_n).items():
                max_ref_counts[ngram] = max(max_ref_counts.get(ngram, 0), c)
        for ngram, c in counts.items():
            correct[len(ngram) - 1] += min(c, max_ref_counts.get(ngram, 0))
        for n in range(1, max_n + 1):
            guess[n - 1] += max(0, len(cand) - n + 1)
        cand_total += len(cand)
        ref_total += min((abs(len(r) - len(cand)), len(r)) for r in refs)[1]
    scores, product = [], 1.0
    for n in range(max_n):
        product *= (correct[n] + tiny) / (guess[n] + small)
        scores.append(product ** (1.0 / (n + 1)))
    ratio = (cand_total + tiny) / (ref_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean ROUGE-L F-score as in coco-caption (module docstring); an empty candidate scores 0."""
    cands, refs_all = _check_corpus(candidates, references)
    scores = []
    for cand, refs in zip(cands, refs_all):
        if not cand:
            scores.append(0.0)
            continue
        lcs = [_lcs_length(ref, cand) for ref in refs]
        precision = max(l / len(cand) for l in lcs)
        recall = max(l / len(ref) if ref else 0.0 for l, ref in zip(lcs, refs))
        if precision == 0 or recall == 0:
            scores.append(0.0)
        else:
            scores.append((1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    return sum(scores) / len(scores)


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4, sigma: float = 6.0) -> float:
    """Corpus CIDEr-D as in coco-caption (module docstring): the mean of the per-clip scores."""
    cands, refs_all = _check_corpus(candidates, references)
    cand_counts = [_ngram_counts(c, max_n) for c in cands]
    ref_counts = [[_ngram_counts(r, max_n) for r in refs] for refs in refs_all]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update(set(ngram for ref in refs for ngram in ref))
    log_num_clips = math.log(len(cands))

    def tfidf(counts: Counter):
        vectors = [defaultdict(float) for _ in range(max_n)]
        norms = [0.0] * max_n
        bigram_length = 0
        for ngram, tf in counts.items():
            n = len(ngram) - 1
            weight = tf * (log_num_clips - math.log(max(1.0, document_frequency[ngram])))
            vectors[n][ngram] = weight
            norms[n] += weight * weight
            if n == 1:
                bigram_length += tf
        return vectors, [math.sqrt(x) for x in norms], bigram_length

    scores = []
    for counts, refs in zip(cand_counts, ref_counts):
        vec, norm, length = tfidf(counts)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, length_r = tfidf(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                value = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec[n].items())
                if norm[n] != 0 and norm_r[n] != 0:
                    value /= norm[n] * norm_r[n]
                total += value * penalty
        scores.append(10.0 * total / max_n / len(refs))
    return sum(scores) / len(scores)


def external_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict, list[str]]:
    """METEOR and SPICE through aac-metrics when Java and aac-metrics are present.

    Returns ({"METEOR": float | None, "SPICE": float | None}, notes): a metric that could not be
    computed is None and a note says why.
    """
    results: dict = {"METEOR": None, "SPICE": None}
    if shutil.which("java") is None:
        return results, ["METEOR and SPICE not computed: Java is not installed (they run on the JVM)"]
    if importlib.util.find_spec("aac_metrics") is None:
        return results, [
            "METEOR and SPICE not computed: the aac-metrics package is not installed "
            "(pip install aac-metrics && aac-metrics-download, which needs network access)"
        ]
    notes = []
    try:
        from aac_metrics import functional as aac_functional  # optional dependency
    except Exception as error:  # a broken install: say so instead of failing the whole evaluation
        return results, [f"METEOR and SPICE not computed: importing aac-metrics failed ({type(error).__name__}: {error})"]
    for name in ("METEOR", "SPICE"):
        # aac-metrics >= 0.3 names them meteor/spice; older releases coco_meteor/coco_spice.
        function = getattr(aac_functional, name.lower(), None) or getattr(aac_functional, f"coco_{name.lower()}", None)
        if function is None:
            notes.append(f"{name} not computed: this aac-metrics version has no {name.lower()} function")
            continue
        try:
            corpus_scores, _ = function(list(candidates), [list(r) for r in references])
            results[name] = float(corpus_scores[name.lower()])
        except Exception as error:  # a missing jar or a JVM failure: report it, keep the other metrics
            notes.append(f"{name} not computed: aac-metrics failed with {type(error).__name__}: {error}")
    return results, notes


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], external: bool = True) -> dict:
    """BLEU-1..4, ROUGE-L, CIDEr-D (and METEOR/SPICE when available) with a 'notes' list."""
    scores = bleu(candidates, references)
    results: dict = {f"BLEU_{n}": s for n, s in enumerate(scores, start=1)}
    results["ROUGE_L"] = rouge_l(candidates, references)
    results["CIDEr-D"] = cider_d(candidates, references)
    notes: list[str] = []
    if external:
        extra, notes = external_metrics(candidates, references)
        results.update(extra)
    else:
        results.update({"METEOR": None, "SPICE": None})
        notes.append("METEOR and SPICE not computed: disabled by the caller")
    results["notes"] = notes
    return results


# ----------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Command line: train on one split, caption and score another
# ----------------------------------------------------------------------------------------------

FEATURES = ("conditioning", "tokens")


def extract_memory(model, waves: list[torch.Tensor], features: str = "conditioning", batch_size: int = 32) -> torch.Tensor:
    """The frozen model's per-token outputs the decoder attends to: conditioning(audio) or h_at."""
    if features == "conditioning":
        return model.conditioning(waves, batch_size=batch_size).float().cpu()
    if features == "tokens":
        return model.audio_to_text_tokens(waves, batch_size=batch_size).float().cpu()
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")


def embedded_captioned(split: str, size: int, clip_seconds: float, seed: int = 0):
    """Soundfont clips of 1-3 seen classes; the captions of a clip are its template prompt in every
    order of its class names (the template says nothing about order)."""
    import itertools

    from collat.data.soundfont import SEEN_CLASSES, SoundfontDataset, make_prompt

    data = SoundfontDataset(split, size=size, seed=seed, classes=SEEN_CLASSES, sources=(1, 3),
                            clip_seconds=clip_seconds, shuffle_labels=False)
    items = [data[i] for i in range(len(data))]
    captions = [[make_prompt(list(order)) for order in itertools.permutations(item["names"])] for item in items]
    return [item["wave"] for item in items], captions


def manifest_captioned(path: str, split: str | None, clip_seconds: float, root: str | None = None):
    """Waves and captions of a manifest split (rows without captions are an error); unreadable files
    are reported and skipped."""
    from collat.data.manifest import ManifestDataset, read_manifest
    from collat.evaluate import _load_manifest_rows

    entries = read_manifest(path, root)
    splits = sorted({entry.split for entry in entries})
    if splits == [""]:
        split = None
    elif split not in splits:
        raise ValueError(f"manifest {path} has no rows in split {split!r}; its splits are {splits}")
    dataset = ManifestDataset(entries, split=split, clip_seconds=clip_seconds, mode="eval", text="caption")
    waves, kept, _ = _load_manifest_rows(dataset, f"{path}:{split or 'all'}")
    return waves, [list(dataset.entries[i].captions) for i in kept]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collat.captioning",
        description="Train a 1-layer transformer captioning decoder on a frozen CoLLAT (paper §5.3) and score "
                    "greedy and beam-search captions with BLEU-1..4, ROUGE-L, CIDEr-D (METEOR/SPICE when "
                    "Java + aac-metrics are present).",
    )
    p.add_argument("--model", required=True, help="CoLLAT checkpoint directory")
    p.add_argument("--manifest", help="captioned manifest (AudioCaps layout: path, caption(s), split); "
                                      "default: the embedded soundfont clips with template captions")
    p.add_argument("--manifest-root")
    p.add_argument("--train-split", default="train")
    p.add_argument("--split", default="test", help="split to caption and score")
    p.add_argument("--train-size", type=int, default=512, help="embedded training clips")
    p.add_argument("--test-size", type=int, default=128, help="embedded test clips")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--features", choices=FEATURES, default="conditioning")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--max-words", type=int, default=30)
    p.add_argument("--min-count", type=int, default=1, help="words seen fewer times become <unk>")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam ranking by log p / length**penalty (1 = mean log-prob per word; 0 favours short captions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--save", help="write the trained captioner here (a folder, replaced atomically)")
    p.add_argument("--out", default="results/captioning.json", help="JSON results (written atomically)")
    p.add_argument("--no-external", action="store_true", help="skip METEOR/SPICE even when available")
    return p


def main(argv=None) -> int:
    from collat.evaluate import load_model, resolve_device
    from collat.fileio import atomic_write_text

    args = build_parser().parse_args(argv)
    try:
        for name in ("epochs", "batch_size", "beam", "dim", "max_words", "train_size", "test_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        device = resolve_device(args.device)
        model = load_model(args.model, device)
        clip_seconds = model.config.clip_seconds
        if args.manifest:
            train_waves, train_captions = manifest_captioned(args.manifest, args.train_split, clip_seconds, args.manifest_root)
            test_waves, test_captions = manifest_captioned(args.manifest, args.split, clip_seconds, args.manifest_root)
        else:
            train_waves, train_captions = embedded_captioned("train", args.train_size, clip_seconds, args.data_seed)
            test_waves, test_captions = embedded_captioned("test", args.test_size, clip_seconds, args.data_seed)
        train_memory = extract_memory(model, train_waves, args.features).to(device)
        test_memory = extract_memory(model, test_waves, args.features).to(device)
        vocab = Vocabulary.build([c for cs in train_captions for c in cs], args.min_count)
        config = CaptionerConfig(memory_dim=train_memory.shape[2], memory_len=train_memory.shape[1],
                                 vocab_size=len(vocab), dim=args.dim, num_heads=4 if args.dim % 4 == 0 else 1,
                                 ff_dim=4 * args.dim, max_words=args.max_words)
        decoder, history = train_captioner(
            train_memory, train_captions, vocab, config,
            CaptionTraining(args.epochs, args.batch_size, args.lr, seed=args.seed), log=print)
        greedy = [vocab.decode(ids) for ids in decoder.greedy(test_memory, vocab)]
        beam = [vocab.decode(ids) for ids in decoder.beam_search(test_memory, vocab, args.beam, None, args.length_penalty)]
        results = {
            "model": os.path.abspath(args.model), "features": args.features, "vocab_size": len(vocab),
            "train_clips": len(train_waves), "test_clips": len(test_waves), "train_loss": history,
            "greedy": caption_metrics(greedy, test_captions, external=not args.no_external),
            f"beam{args.beam}": caption_metrics(beam, test_captions, external=not args.no_external),
            "examples": [{"references": refs, "greedy": g, f"beam{args.beam}": b}
                         for refs, g, b in list(zip(test_captions, greedy, beam))[:5]],
        }
        if args.save:
            save_captioner(args.save, decoder, vocab, {"collat_model": os.path.abspath(args.model), "features": args.features})
        atomic_write_text(args.out, json.dumps(results, indent=2))
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        print(f"collat.captioning: error: {error}", file=sys.stderr)
        return 1
    names = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr-D", "METEOR", "SPICE"]
    print("| decoding | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for decoding in ("greedy", f"beam{args.beam}"):
        row = results[decoding]
        print(f"| {decoding} | " + " | ".join("n/a" if row[n] is None else f"{row[n]:.4f}" for n in names) + " |")
    for note in results["greedy"]["notes"]:
        print(f"note: {note}")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
