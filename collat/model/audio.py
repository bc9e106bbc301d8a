"""Audio side: the kaldi fbank front end and the AST encoder f_a (docs/design.md §1).

wave [B, T] at 16 kHz -> fbank [B, target_frames, 128] (deterministic: crop or zero-pad at the end,
never a random crop) -> AST patches 16x16 with stride 10 in both axes -> patch tokens [B, M, D_a]
-> Linear -> [B, M, D_t].
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn

from collat.config import AUDIOSET_MEAN, AUDIOSET_STD, WINDOW_TYPES

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_SHIFT_MS = 10
FRAME_LENGTH_MS = 25
PATCH = 16
STRIDE = 10
PREEMPHASIS = 0.97  # kaldi's preemphasis_coefficient
BLACKMAN_COEFF = 0.42  # kaldi's blackman_coeff
EPSILON = torch.finfo(torch.float32).eps  # kaldi's floor of the mel energies before the log
CPU_SLICE_FRAMES = 1600  # frames per slice on the CPU (~3 MB of frames: stays in cache)
MEL_BANDS = 8  # column blocks of the mel matrix on the CPU (each block's nonzero rows are a narrow band)

# hidden size, layers, heads (MLP 4x). "tiny" is the CPU size of docs/design.md §5; "micro" is for tests.
AST_SIZES = {
    "micro": (64, 1, 2),
    "tiny": (192, 4, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
}


def frames_for_seconds(seconds: float) -> int:
    """Number of fbank frames (10 ms shift) for a clip length; 10 s -> 1000 (AST pads to 1024)."""
    return int(round(seconds * 1000 / FRAME_SHIFT_MS))


def num_patches(target_frames: int, num_mel_bins: int = NUM_MEL_BINS, stride: int = STRIDE) -> int:
    freq = (num_mel_bins - PATCH) // stride + 1
    time = (target_frames - PATCH) // stride + 1
    return freq * time


class FbankFrontEnd(nn.Module):
    """Batched kaldi fbank on the wave's device, crop/pad to `target_frames`, normalise (x - mean) / (2 * std).

    Clip by clip it equals `torchaudio.compliance.kaldi.fbank(wave - wave.mean(), htk_compat=True,
    use_energy=False, window_type=..., num_mel_bins=128, dither=0.0, frame_shift=10)` (the definition,
    docs/design.md §1), in the same order of operations (the lowest bins after pre-emphasis are
    cancellation-dominated, so a reordered formula drifts from it). torchaudio's function takes one 1-D
    clip per call and rebuilds the mel bank on the host every call, so its steps are written here over
    a batch: window and mel matrix are buffers built once (non-persistent: checkpoints keep their keys);
    a batch is a few launches and no host sync. On the CPU the batch goes through in cache-sized slices
    of clips and the mel projection skips the zeros of the banded mel matrix (both measured faster).
    window_type 'hamming' follows the paper; pretrained AST checkpoints were trained with 'hanning'.
    """

    def __init__(
        self,
        target_frames: int,
        window_type: str = "hamming",
        sample_rate: int = SAMPLE_RATE,
        num_mel_bins: int = NUM_MEL_BINS,
        mean: float = AUDIOSET_MEAN,
        std: float = AUDIOSET_STD,
    ):
        super().__init__()
        if window_type not in WINDOW_TYPES:
            raise ValueError(f"window_type must be one of {WINDOW_TYPES}, got {window_type!r}")
        if target_frames < PATCH:
            raise ValueError(f"target_frames must be >= {PATCH}, got {target_frames}")
        self.target_frames = target_frames
        self.window_type = window_type
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.mean, self.std = mean, std
        self.window_size = sample_rate * FRAME_LENGTH_MS // 1000
        self.window_shift = sample_rate * FRAME_SHIFT_MS // 1000
        self.min_samples = self.window_size
        self.n_fft = 1 << (self.window_size - 1).bit_length()  # kaldi's round_to_power_of_two
        self.register_buffer("window", kaldi_window(window_type, self.window_size), persistent=False)
        mel, _ = torchaudio.compliance.kaldi.get_mel_banks(num_mel_bins, self.n_fft, float(sample_rate), 20.0, 0.0,
                                                           100.0, -500.0, 1.0)
        # kaldi's bank has no Nyquist column (torchaudio pads a zero one). Each FFT bin's row appears twice,
        # for the real and the imaginary part: |X|^2 @ mel is then one matmul of the squared (re, im) pairs.
        mel = F.pad(mel.float(), (0, 1)).T.repeat_interleave(2, dim=0).contiguous()  # [2 * (n_fft // 2 + 1), mels]
        self.register_buffer("mel_pairs", mel, persistent=False)
        self.mel_bands = _mel_bands(mel, MEL_BANDS)

    @property
    def padding_value(self) -> float:
        """The normalised value of a frame of zeros (what padding and AST's SpecAugment masks leave)."""
        return (0.0 - self.mean) / (2 * self.std)

    def check_wave(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        if sample_rate is not None and sample_rate != self.sample_rate:
            raise ValueError(
                f"sample_rate must be {self.sample_rate} Hz, got {sample_rate} Hz "
                "(resample first, e.g. torchaudio.functional.resample)"
            )
        if not isinstance(wave, torch.Tensor):
            raise TypeError(f"wave must be a torch.Tensor, got {type(wave).__name__}")
        if not wave.is_floating_point():
            raise TypeError(f"wave must be a floating-point tensor, got {wave.dtype}")
        if wave.dim() == 1:
            wave = wave[None]
        if wave.dim() != 2:
            raise ValueError(f"wave must have shape [B, T] (mono, {self.sample_rate} Hz), got {tuple(wave.shape)}")
        if wave.shape[0] > 0 and wave.shape[1] < self.min_samples:
            raise ValueError(
                f"wave is too short: {wave.shape[1]} samples, need at least {self.min_samples} "
                f"({FRAME_LENGTH_MS} ms at {self.sample_rate} Hz)"
            )
        return wave

    def num_frames(self, num_samples: int) -> int:
        """Frames of a clip of num_samples (kaldi's snip_edges=True: only frames that fit whole)."""
        return 1 + (num_samples - self.window_size) // self.window_shift

    def log_mel(self, wave: torch.Tensor, max_frames: int | None = None) -> torch.Tensor:
        """Kaldi log-mel energies [B, frames, mels] (fp32) of waves [B, T]; only the first max_frames."""
        wave = wave.float()
        wave = wave - wave.mean(dim=1, keepdim=True)  # the whole clip's mean, before any crop
        frames = self.num_frames(wave.shape[1]) if max_frames is None else min(max_frames, self.num_frames(wave.shape[1]))
        wave = wave[:, : self.window_size + (frames - 1) * self.window_shift]
        B = wave.shape[0]
        out = wave.new_empty(B, frames, self.num_mel_bins)
        chunk = B if wave.device.type != "cpu" else max(1, CPU_SLICE_FRAMES // frames)
        centred = wave.new_empty(min(chunk, B), frames, self.window_size)
        padded = wave.new_zeros(min(chunk, B), frames, self.n_fft)  # columns past the window stay zero
        for start in range(0, B, chunk):
            n = min(chunk, B - start)
            self._log_mel_slice(wave[start : start + n], centred[:n], padded[:n], out[start : start + n])
        return out

    def _log_mel_slice(self, wave, centred, padded, out) -> None:
        frames = wave.unfold(1, self.window_size, self.window_shift)  # [n, m, window], a view
        x = torch.sub(frames, frames.mean(dim=2, keepdim=True), out=centred)  # remove_dc_offset
        # Pre-emphasis y[j] = x[j] - 0.97 x[j - 1], with x[-1] = x[0] (kaldi's replicate edge), then the window.
        y = padded[..., : self.window_size]
        torch.add(x[..., 1:], x[..., :-1], alpha=-PREEMPHASIS, out=y[..., 1:])
        torch.sub(x[..., 0], x[..., 0] * PREEMPHASIS, out=y[..., 0])
        y.mul_(self.window.float())  # (float: a model.to(dtype) casts buffers)
        spectrum = torch.fft.rfft(padded)  # [n, m, n_fft // 2 + 1] complex
        pairs = torch.view_as_real(spectrum).reshape(-1, self.mel_pairs.shape[0]).square_()  # re^2, im^2
        mel, flat_out = self.mel_pairs.float(), out.view(-1, self.num_mel_bins)
        if wave.device.type != "cpu":
            torch.mm(pairs, mel, out=flat_out)
        else:
            for low, high, first, last in self.mel_bands:
                flat_out[:, first:last] = pairs[:, low:high] @ mel[low:high, first:last]
        out.clamp_(min=EPSILON).log_()

    def pad_or_crop(self, fbank: torch.Tensor) -> torch.Tensor:
        frames = fbank.shape[-2]
        if frames < self.target_frames:
            return F.pad(fbank, (0, 0, 0, self.target_frames - frames))
        return fbank[..., : self.target_frames, :]

    @torch.no_grad()
    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        wave = self.check_wave(wave, sample_rate)
        if wave.shape[0] == 0:
            return wave.new_zeros(0, self.target_frames, self.num_mel_bins, dtype=torch.float32)
        # Outside autocast: the mel projection is a matmul that bf16 autocast would otherwise round.
        with torch.autocast(wave.device.type, enabled=False):
            feats = self.pad_or_crop(self.log_mel(wave, self.target_frames))
            return (feats - self.mean) / (2 * self.std)


def _mel_bands(mel: torch.Tensor, bands: int) -> list[tuple[int, int, int, int]]:
    """(first row, end row, first mel, end mel) blocks covering the nonzeros of the banded mel matrix."""
    nonzero, per_band, blocks = mel > 0, -(-mel.shape[1] // bands), []
    for first in range(0, mel.shape[1], per_band):
        last = min(first + per_band, mel.shape[1])
        rows = nonzero[:, first:last].any(dim=1).nonzero().flatten()
        if len(rows):
            blocks.append((int(rows.min()), int(rows.max()) + 1, first, last))
        else:
            blocks.append((0, 0, first, last))
    return blocks


def kaldi_window(window_type: str, size: int) -> torch.Tensor:
    """The frame window exactly as torchaudio.compliance.kaldi defines it (symmetric windows; povey is
    hann ** 0.85; blackman with kaldi's coefficient 0.42, not torch.blackman_window's)."""
    if window_type == "hanning":
        return torch.hann_window(size, periodic=False)
    if window_type == "hamming":
        return torch.hamming_window(size, periodic=False, alpha=0.54, beta=0.46)
    if window_type == "povey":
        return torch.hann_window(size, periodic=False).pow(0.85)
    if window_type == "rectangular":
        return torch.ones(size)
    if window_type == "blackman":
        a = 2 * math.pi / (size - 1)
        n = torch.arange(size, dtype=torch.float32)
        return BLACKMAN_COEFF - 0.5 * torch.cos(a * n) + (0.5 - BLACKMAN_COEFF) * torch.cos(2 * a * n)
    raise ValueError(f"window_type must be one of {WINDOW_TYPES}, got {window_type!r}")


class ASTEncoder(nn.Module):
    """transformers' AST: patch tokens (cls/distillation tokens dropped) projected to the text width."""

    def __init__(
        self,
        out_dim: int,
        target_frames: int,
        size: str = "tiny",
        checkpoint: str | None = None,
        num_mel_bins: int = NUM_MEL_BINS,
        patch_stride: int = STRIDE,
        architecture: dict | None = None,
    ):
        """The AST is the `size` preset, the local `checkpoint` folder, or, with `architecture` (what
        `architecture()` returned), rebuilt from its recorded config with random weights (the caller loads
        the weights; `checkpoint` is not read)."""
        super().__init__()
        from transformers import ASTConfig, ASTModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if architecture is not None:
            if architecture.get("type") != "ast":
                raise ValueError(f"the audio encoder needs an 'ast' architecture, got {architecture.get('type')!r}")
            config = ASTConfig.from_dict(architecture["ast_config"])
            if config.max_length != target_frames:
                raise ValueError(f"the saved AST takes {config.max_length} fbank frames, the config asks for {target_frames}")
            with torch.random.fork_rng(devices=[]):  # random weights, overwritten by the caller
                self.ast = ASTModel._from_config(config, attn_implementation="sdpa")
        elif checkpoint is not None:
            if not os.path.isdir(checkpoint):
                raise FileNotFoundError(f"AST checkpoint directory not found: {checkpoint}")
            self.ast = ASTModel.from_pretrained(checkpoint, local_files_only=True, attn_implementation="sdpa")
            _fit_time_positions(self.ast, target_frames)
        else:
            if size not in AST_SIZES:
                raise ValueError(f"audio size must be one of {list(AST_SIZES)}, got {size!r}")
            hidden, layers, heads = AST_SIZES[size]
            config = ASTConfig(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                intermediate_size=4 * hidden,
                patch_size=PATCH,
                frequency_stride=patch_stride,
                time_stride=patch_stride,
                num_mel_bins=num_mel_bins,
                max_length=target_frames,
            )
            self.ast = ASTModel._from_config(config, attn_implementation="sdpa")
        config = self.ast.config
        self.num_tokens = (
            ((config.num_mel_bins - config.patch_size) // config.frequency_stride + 1)
            * ((target_frames - config.patch_size) // config.time_stride + 1)
        )
        self.proj = nn.Linear(self.ast.config.hidden_size, out_dim)

    def architecture(self) -> dict:
        """The AST's transformers config (positions fitted to the clip length), without the path it came from."""
        values = self.ast.config.to_dict()
        values.pop("_name_or_path", None)
        return {"type": "ast", "ast_config": values}

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        hidden = self.ast(input_values=fbank).last_hidden_state
        return self.proj(hidden[:, 2:])  # drop the cls and distillation tokens


def _fit_time_positions(ast, target_frames: int) -> None:
    """Crop (or interpolate) a pretrained AST's time positional embeddings to `target_frames`, as AST does
    for clips shorter than its training length."""
    config = ast.config
    freq = (config.num_mel_bins - config.patch_size) // config.frequency_stride + 1
    old_time = (config.max_length - config.patch_size) // config.time_stride + 1
    new_time = (target_frames - config.patch_size) // config.time_stride + 1
    if new_time == old_time:
        return
    pos = ast.embeddings.position_embeddings.data  # [1, 2 + freq * old_time, D]
    special, grid = pos[:, :2], pos[:, 2:]
    D = grid.shape[-1]
    grid = grid.reshape(1, freq, old_time, D).permute(0, 3, 1, 2)
    if new_time < old_time:
        grid = grid[..., :new_time]
    else:
        grid = torch.nn.functional.interpolate(grid, size=(freq, new_time), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, freq * new_time, D)
    ast.embeddings.position_embeddings = nn.Parameter(torch.cat([special, grid], dim=1))
    config.max_length = target_frames
    ast.embeddings.config = config
