"""Training-time transforms of waves and fbanks (docs/design.md §5, "Augmentation"): batched on the
batch's device, every random draw from the generator the caller passes, no host sync.

    masks = SpecMasks.draw(B, max_time=80, max_freq=24, generator=g)  # AST's SpecAugment
    fbank = masks.apply(fbank, fill)            # (CoLLAT.compute_losses applies them after the front end)
    wave = random_gain(wave, 6.0, g); wave = random_polarity(wave, g); wave = random_time_shift(wave, 8000, g)
    wave = mix_clips(wave, rows, partners, g)   # mixup: prompts are combined by collat.train.augment

torchaudio's masking transforms draw from the global RNG (no generator argument), and the batch must be
reproducible per (seed, step); so the masks are drawn here, with torchaudio's distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _uniform(shape, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device) * (high - low) + low


@dataclass
class SpecMasks:
    """SpecAugment time and frequency masks for a batch, as AST trains with (torchaudio's TimeMasking /
    FrequencyMasking, one each by default): per clip and mask, width = floor(u * max_width) and start =
    floor(v * (size - width)) with u, v uniform in [0, 1). The draws u, v are kept ([B, masks] on the
    batch's device) and resolved against the fbank's size when applied."""

    max_time: int
    max_freq: int
    time_draws: torch.Tensor  # [B, masks, 2]: (u, v) of each time mask
    freq_draws: torch.Tensor  # [B, masks, 2]

    @classmethod
    def draw(cls, batch: int, max_time: int, max_freq: int, generator: torch.Generator, time_masks: int = 1,
             freq_masks: int = 1) -> "SpecMasks":
        if max_time < 0 or max_freq < 0:
            raise ValueError(f"mask widths must be >= 0, got max_time={max_time}, max_freq={max_freq}")
        return cls(max_time, max_freq, _uniform((batch, time_masks, 2), generator),
                   _uniform((batch, freq_masks, 2), generator))

    def with_twins(self, count: int) -> "SpecMasks":
        """The masks of a batch extended by twins of its first `count` clips (each twin masked like its clip)."""
        return SpecMasks(self.max_time, self.max_freq, torch.cat([self.time_draws, self.time_draws[:count]]),
                         torch.cat([self.freq_draws, self.freq_draws[:count]]))

    @staticmethod
    def bands(draws: torch.Tensor, size: int, max_width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(start, width) [B, masks] of the masks along an axis of `size`."""
        width = (draws[..., 0] * min(max_width, size)).floor()
        start = (draws[..., 1] * (size - width)).floor()
        return start, width

    def covered(self, frames: int, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean [B, frames] and [B, bins]: where the time and the frequency masks lie."""
        def along(size, draws, max_width):
            start, width = self.bands(draws, size, max_width)
            position = torch.arange(size, device=draws.device, dtype=draws.dtype)[None, None, :]
            return ((position >= start[..., None]) & (position < (start + width)[..., None])).any(dim=1)

        return along(frames, self.time_draws, self.max_time), along(bins, self.freq_draws, self.max_freq)

    def apply(self, fbank: torch.Tensor, fill: float) -> torch.Tensor:
        """fbank [B, frames, bins] with the masked frames and bins set to `fill` (a new tensor)."""
        if fbank.shape[0] != self.time_draws.shape[0]:
            raise ValueError(f"SpecMasks: drawn for {self.time_draws.shape[0]} clips, got an fbank of {fbank.shape[0]}")
        in_time, in_freq = self.covered(fbank.shape[1], fbank.shape[2])
        return fbank.masked_fill(in_time[:, :, None] | in_freq[:, None, :], fill)


def random_gain(wave: torch.Tensor, max_db: float, generator: torch.Generator) -> torch.Tensor:
    """Each clip scaled by a gain uniform in [-max_db, +max_db] dB."""
    db = _uniform((wave.shape[0], 1), generator, -max_db, max_db)
    return wave * torch.pow(10.0, db / 20).to(wave.dtype)


def random_polarity(wave: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each clip's sign flipped with probability 1/2."""
    flip = _uniform((wave.shape[0], 1), generator) < 0.5
    return torch.where(flip, -wave, wave)


def random_time_shift(wave: torch.Tensor, max_samples: int, generator: torch.Generator) -> torch.Tensor:
    """Each clip rolled (circularly) by a whole number of samples uniform in [-max_samples, max_samples]."""
    T = wave.shape[1]
    max_samples = min(int(max_samples), T - 1)
    if max_samples <= 0:
        return wave
    shift = torch.randint(-max_samples, max_samples + 1, (wave.shape[0], 1), generator=generator,
                          device=generator.device)
    index = (torch.arange(T, device=wave.device)[None, :] - shift) % T  # out[t] = wave[t - shift]
    return wave.gather(1, index)


def mix_clips(wave: torch.Tensor, rows: torch.Tensor, partners: torch.Tensor, generator: torch.Generator,
              partner_gain: tuple[float, float] = (0.5, 1.0)) -> torch.Tensor:
    """wave with wave[rows] replaced by wave[rows] + g * wave[partners] (g uniform in partner_gain, the
    embedded generator's range of source levels), rescaled to the peak of wave[rows]. Index tensors on
    wave's device; partners are read from the input, so a clip mixed into another is its original."""
    if rows.numel() == 0:
        return wave
    gain = _uniform((rows.shape[0], 1), generator, *partner_gain).to(wave.dtype)
    own = wave[rows]
    mixed = own + gain * wave[partners]
    scale = own.abs().amax(dim=1, keepdim=True) / mixed.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
    out = wave.clone()
    out[rows] = mixed * scale
    return out
