"""Caption words: the tokenizer of the built-in metrics and the decoder's vocabulary.

Tokenisation: lower-case words; punctuation is dropped (coco-caption uses the Java PTB tokenizer, which
does the same for plain captions).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased words without punctuation: "A dog, barking!" -> ["a", "dog", "barking"]."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    return _WORD.findall(text.lower())


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
