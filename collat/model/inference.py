"""How the inference API (CoLLAT.encode_audio, zero_shot, conditioning, audio_to_text_tokens) and
`python -m collat.predict` turn any audio into batches of clip-length windows, and back into one result
per clip. One rule for all of them:

- Inputs: a tensor [B, T] or [T], a file path, or a list of 1-D tensors and/or paths. Tensors are taken
  at `sample_rate` and resampled to the model's 16 kHz with torchaudio; files carry their own rate.
- Long audio: cut into consecutive windows of the model's clip length; a last piece shorter than half a
  window is dropped unless it is the only one. Each window is encoded on its own and a clip's result is
  the mean over its windows.
- Short audio (and a kept short last piece) is zero-padded at the end to the window length, as training
  pads its clips.
- Streaming: a file is read when its batch is built, so memory follows `batch_size`, not the list.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F

from collat.data.audio_io import load_audio


def split_windows(wave: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Consecutive windows of `window` samples of a 1-D wave (views, no copies); see the module docstring."""
    if window < 1:
        raise ValueError(f"window must be >= 1 sample, got {window}")
    if wave.shape[-1] <= window:
        return [wave]
    pieces = [wave[start : start + window] for start in range(0, wave.shape[-1], window)]
    if pieces[-1].shape[-1] < window // 2:
        pieces = pieces[:-1]
    return pieces


def window_count(num_samples: int, window: int) -> int:
    """len(split_windows(wave, window)) for a wave of `num_samples`, without the wave."""
    if num_samples <= window:
        return 1
    full, rest = divmod(num_samples, window)
    return full + (1 if rest >= window // 2 and rest > 0 else 0)


def audio_items(audio) -> list:
    """The accepted audio inputs as a list of items (1-D tensors or paths), nothing read yet."""
    if isinstance(audio, torch.Tensor):
        if audio.dim() == 1:
            audio = audio[None]
        if audio.dim() != 2:
            raise ValueError(f"audio tensor must have shape [B, T] or [T] (mono), got {tuple(audio.shape)}")
        return list(audio)
    if isinstance(audio, (str, os.PathLike)):
        return [audio]
    if not isinstance(audio, (list, tuple)):
        raise TypeError(f"audio must be a tensor [B, T], a list of 1-D tensors or a list of file paths, got {type(audio).__name__}")
    for i, item in enumerate(audio):
        if isinstance(item, torch.Tensor):
            if item.dim() != 1:
                raise ValueError(f"audio[{i}] must be a 1-D waveform, got shape {tuple(item.shape)}")
        elif not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"audio[{i}] must be a file path or a 1-D tensor, got {type(item).__name__}")
    return list(audio)


def read_wave(item, index: int, sample_rate: int, model_rate: int) -> torch.Tensor:
    """One item as a float 1-D wave at `model_rate`: a file is read (at its own rate), a tensor resampled."""
    if isinstance(item, (str, os.PathLike)):
        return load_audio(item, model_rate)
    if not item.is_floating_point():
        raise TypeError(f"audio[{index}] must be a floating-point waveform, got {item.dtype}")
    if item.shape[0] == 0:
        raise ValueError(f"audio[{index}] is empty")
    wave = item.float()
    if sample_rate != model_rate:
        import torchaudio

        wave = torchaudio.functional.resample(wave, sample_rate, model_rate)
    return wave


def window_batches(items: list, window: int, batch_size: int, sample_rate: int, model_rate: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Batches [b, window] of windows (zero-padded to the window length) and the clip index of each row;
    the windows of a clip are consecutive. Items are read one by one as the batches need them."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int (Hz), got {sample_rate!r}")
    rows, ids = [], []
    for index, item in enumerate(items):
        for piece in split_windows(read_wave(item, index, sample_rate, model_rate), window):
            rows.append(F.pad(piece.to(device), (0, window - piece.shape[-1])))
            ids.append(index)
            if len(rows) == batch_size:
                yield torch.stack(rows), ids
                rows, ids = [], []
    if rows:
        yield torch.stack(rows), ids


def average_by_clip(outputs: Iterable[tuple[torch.Tensor, list[int]]]) -> list[torch.Tensor]:
    """Per-clip means of window outputs given as (outputs [b, ...], clip index per row) in clip order."""
    means: list[torch.Tensor] = []
    current, total, count = None, None, 0
    for out, ids in outputs:
        start = 0
        for end in range(1, len(ids) + 1):
            if end < len(ids) and ids[end] == ids[start]:
                continue
            segment = out[start:end].sum(dim=0)
            if ids[start] == current:
                total, count = total + segment, count + (end - start)
            else:
                if current is not None:
                    means.append(total / count)
                current, total, count = ids[start], segment, end - start
            start = end
    if current is not None:
        means.append(total / count)
    return means


def prompt_for(label: str, template: str | None) -> str:
    """The zero-shot prompt of a label: collat.prompts' template by default, else `template` with its
    "{}" replaced by the label."""
    from collat.prompts import make_prompt

    if template is None:
        return make_prompt([label])
    if not isinstance(template, str) or "{}" not in template:
        raise ValueError(f"template must be a str with '{{}}' where the label goes, e.g. 'the sound of {{}}', got {template!r}")
    return template.replace("{}", label)
