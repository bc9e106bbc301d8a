"""Captioning audio with a frozen CoLLAT and a saved captioner: the features the decoder reads, and
captions for new files, read and decoded batch by batch (memory follows the batch, not the file list)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from collat.captioning.decoder import CaptionDecoder, load_captioner
from collat.captioning.vocab import Vocabulary
from collat.data.audio_io import AudioReadError, load_audio

FEATURES = ("conditioning", "tokens")


def extract_memory(model, audio, features: str = "conditioning", batch_size: int = 32) -> torch.Tensor:
    """The frozen model's per-token outputs the decoder attends to: conditioning(audio) or h_at (audio as
    the model's inference API takes it; long audio is averaged over windows)."""
    if features == "conditioning":
        return model.conditioning(audio, batch_size=batch_size).float().cpu()
    if features == "tokens":
        return model.audio_to_text_tokens(audio, batch_size=batch_size).float().cpu()
    raise ValueError(f"features must be one of {FEATURES}, got {features!r}")


@dataclass
class Captioner:
    """A saved captioner: the decoder, its vocabulary and what it was trained on (captioner.json)."""

    decoder: CaptionDecoder
    vocab: Vocabulary
    meta: dict

    @classmethod
    def load(cls, directory: str, device: torch.device | str = "cpu") -> Captioner:
        decoder, vocab, meta = load_captioner(directory)
        return cls(decoder.to(device), vocab, meta)

    @property
    def features(self) -> str:
        return self.meta.get("features", "conditioning")

    def check_model(self, model) -> None:
        """Refuse a CoLLAT whose features do not have the shape this captioner was trained on."""
        config = self.decoder.config
        width = model.text.width
        if (model.context_length, width) != (config.memory_len, config.memory_dim):
            trained_on = self.meta.get("collat_model", "unknown")
            raise ValueError(
                f"the captioner reads {self.features} features of shape [{config.memory_len}, {config.memory_dim}] "
                f"but this model gives [{model.context_length}, {width}]; use the CoLLAT it was trained on "
                f"({trained_on})")

    def decode(self, memory: torch.Tensor, beam: int = 3, length_penalty: float = 1.0) -> list[str]:
        memory = memory.to(next(self.decoder.parameters()).device)
        if beam == 1:
            ids = self.decoder.greedy(memory, self.vocab)
        else:
            ids = self.decoder.beam_search(memory, self.vocab, beam, None, length_penalty)
        return [self.vocab.decode(row) for row in ids]


def caption_files(model, captioner: Captioner, paths: list[str], beam: int = 3, length_penalty: float = 1.0,
                  batch_size: int = 16) -> Iterator[tuple[str, str | None, str | None]]:
    """(path, caption, None) or (path, None, error message) per file, in order, batch by batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rate = model.frontend.sample_rate
    for start in range(0, len(paths), batch_size):
        waves, read, failed = [], [], {}
        for path in paths[start : start + batch_size]:
            try:
                waves.append(load_audio(path, rate))
                read.append(path)
            except AudioReadError as error:
                failed[path] = f"cannot read audio: {error.reason}"
        captions = {}
        if waves:
            memory = extract_memory(model, waves, captioner.features, batch_size=len(waves))
            captions = dict(zip(read, captioner.decode(memory, beam, length_penalty)))
        for path in paths[start : start + batch_size]:
            yield (path, captions[path], None) if path in captions else (path, None, failed[path])


def recorded_model(captioner: Captioner) -> str | None:
    """The CoLLAT folder the captioner was trained on, if recorded and still there."""
    path = captioner.meta.get("collat_model")
    return path if path and os.path.exists(path) else None
