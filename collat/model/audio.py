"""Audio side: the kaldi fbank front end and the AST encoder f_a (DESIGN.md section 1).

wave [B, T] at 16 kHz -> fbank [B, target_frames, 128] (deterministic: crop or zero-pad at the end,
never a random crop) -> AST patches 16x16 with stride 10 in both axes -> patch tokens [B, M, D_a]
-> Linear -> [B, M, D_t].
"""
from __future__ import annotations

import os

import torch
import torchaudio
from torch import nn

from collat.config import AUDIOSET_MEAN, AUDIOSET_STD, WINDOW_TYPES

SAMPLE_RATE = 16000
NUM_MEL_BINS = 128
FRAME_SHIFT_MS = 10
FRAME_LENGTH_MS = 25
PATCH = 16
STRIDE = 10

# hidden size, layers, heads (MLP 4x). "tiny" is the CPU size of DESIGN.md section 5; "micro" is for tests.
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
    """torchaudio kaldi fbank, crop/pad to `target_frames`, normalise (x - mean) / (2 * std).

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
        self.min_samples = sample_rate * FRAME_LENGTH_MS // 1000

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

    def raw_fbank(self, wave_1d: torch.Tensor) -> torch.Tensor:
        wave_1d = wave_1d.float()
        return torchaudio.compliance.kaldi.fbank(
            (wave_1d - wave_1d.mean())[None],
            htk_compat=True,
            sample_frequency=self.sample_rate,
            use_energy=False,
            window_type=self.window_type,
            num_mel_bins=self.num_mel_bins,
            dither=0.0,
            frame_shift=FRAME_SHIFT_MS,
        )

    def pad_or_crop(self, fbank: torch.Tensor) -> torch.Tensor:
        frames = fbank.shape[0]
        if frames < self.target_frames:
            return torch.nn.functional.pad(fbank, (0, 0, 0, self.target_frames - frames))
        return fbank[: self.target_frames]

    @torch.no_grad()
    def forward(self, wave: torch.Tensor, sample_rate: int | None = None) -> torch.Tensor:
        wave = self.check_wave(wave, sample_rate)
        if wave.shape[0] == 0:
            return wave.new_zeros(0, self.target_frames, self.num_mel_bins, dtype=torch.float32)
        # Outside autocast: the mel projection is a matmul that bf16 autocast would otherwise round.
        with torch.autocast(wave.device.type, enabled=False):
            feats = torch.stack([self.pad_or_crop(self.raw_fbank(w)) for w in wave])
        return (feats - self.mean) / (2 * self.std)


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
