"""Reading audio files, the one loader of collat: soundfile decodes, torchaudio resamples.

Every clip comes out mono float32 at `sample_rate`. With `clip_seconds`, it is cut or zero-padded
to exactly that length:
- mode="eval" (deterministic): a long clip keeps its START (`crop="start"`, the default; the
  labels of AudioSet/FSD50K/ESC-50 clips describe the whole clip and most have their event near
  the start) or its middle (`crop="center"`); a short clip is padded with zeros at the end.
- mode="train": a long clip is cut at a random offset drawn from `rng`; a short clip is padded at
  the end as in eval.
Zero padding only lengthens a clip that was read successfully; a file that cannot be read raises
AudioReadError and is never replaced by zeros.
"""
from __future__ import annotations

import io
import math
import os

import numpy as np
import soundfile
import torch
import torchaudio

MODES = ("eval", "train")
CROPS = ("start", "center")


class AudioReadError(RuntimeError):
    """A file that is missing, corrupt, empty or otherwise unreadable as audio."""

    def __init__(self, path, reason: str):
        self.path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
        self.reason = reason
        super().__init__(f"cannot read audio {self.path}: {reason}")

    def __reduce__(self):  # keeps (path, reason) when the error crosses a DataLoader worker boundary
        return (type(self), (self.path, self.reason))


class AudioFileNotFoundError(AudioReadError, FileNotFoundError):
    """The audio file is not there (also a FileNotFoundError, as open() would raise)."""


def fit_length(wave: torch.Tensor, num_frames: int, mode: str = "eval", rng: np.random.Generator | None = None,
               crop: str = "start") -> torch.Tensor:
    """Cut or zero-pad a 1-D wave to `num_frames` (see the module docstring for the rules)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be > 0, got {num_frames}")
    length = wave.shape[-1]
    if length > num_frames:
        excess = length - num_frames
        if mode == "train":
            offset = int((rng if rng is not None else np.random.default_rng()).integers(0, excess + 1))
        else:
            offset = 0 if crop == "start" else excess // 2
        return wave[..., offset:offset + num_frames]
    if length < num_frames:
        return torch.nn.functional.pad(wave, (0, num_frames - length))
    return wave


def _check_options(sample_rate, clip_seconds, mode: str, crop: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if not isinstance(sample_rate, int) or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    if clip_seconds is not None and not (isinstance(clip_seconds, (int, float)) and 0 < clip_seconds < math.inf):
        raise ValueError(f"clip_seconds must be > 0 or None, got {clip_seconds!r}")


def _crop_offset(length: int, num_frames: int, mode: str, rng, crop: str) -> int:
    """Where fit_length cuts a wave of `length` samples (drawn from rng the same way)."""
    excess = length - num_frames
    if excess <= 0:
        return 0
    if mode == "train":
        return int((rng if rng is not None else np.random.default_rng()).integers(0, excess + 1))
    return 0 if crop == "start" else excess // 2


def _file_window(frames: int, file_rate: int, sample_rate: int, num_frames: int, offset: int) -> tuple[int, int, int]:
    """(first file frame, file frames to read, index of the wanted first output sample in the resampled
    read): enough file frames around the wanted output samples [offset, offset + num_frames) that
    resampling them gives those samples as resampling the whole file would (torchaudio's sinc kernel,
    lowpass_filter_width 6 and rolloff 0.99, spans `width` frames on each side of its stride of `orig`)."""
    if file_rate == sample_rate:
        return offset, num_frames, 0
    gcd = math.gcd(file_rate, sample_rate)
    orig, new = file_rate // gcd, sample_rate // gcd
    width = math.ceil(6 * orig / (0.99 * min(orig, new)))
    first_block = max(0, offset // new - width // orig - 2)  # reads start on a stride boundary: same kernel phases
    last_block = (offset + num_frames - 1) // new
    start = first_block * orig
    end = min(frames, (last_block + 2) * orig + width + 1)
    return start, max(end - start, 0), offset - first_block * new


def _read_frames(handle: soundfile.SoundFile, start: int, count: int) -> np.ndarray:
    if start:
        if handle.seekable():
            handle.seek(start)
        else:  # a stream: skip in blocks, so memory stays bounded by a block
            for _ in handle.blocks(blocksize=1 << 16, frames=start, dtype="float32"):
                pass
    return handle.read(count, dtype="float32", always_2d=True)


def decode_audio(source, sample_rate: int = 16000, clip_seconds: float | None = None, mode: str = "eval",
                 rng: np.random.Generator | None = None, crop: str = "start", name=None) -> torch.Tensor:
    """Decode a path or a file-like object / bytes holding WAV, FLAC, OGG, ... (whatever libsndfile reads).

    Returns a float32 tensor [T]. With `clip_seconds`, only the frames of that window are decoded
    (the header's length places the crop), so memory is bounded by the window, not by the file.
    Raises AudioReadError (naming `name`, or the path) when the data cannot be decoded, holds no
    frames or holds non-finite samples.
    """
    _check_options(sample_rate, clip_seconds, mode, crop)
    label = name if name is not None else source
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    num_frames = int(round(clip_seconds * sample_rate)) if clip_seconds is not None else None
    try:
        with soundfile.SoundFile(source) as handle:
            frames, file_rate = handle.frames, handle.samplerate
            if frames <= 0:
                raise AudioReadError(label, "the file holds no audio frames (empty)")
            skip = 0
            if num_frames is None:
                start, count = 0, frames
            else:
                # resampled length as torchaudio computes it: ceil(frames * new / orig)
                length = -(-frames * sample_rate // file_rate)
                offset = _crop_offset(length, num_frames, mode, rng, crop)
                start, count, skip = _file_window(frames, file_rate, sample_rate, num_frames, offset)
            data = _read_frames(handle, start, count)
    except FileNotFoundError:
        raise AudioFileNotFoundError(label, "no such file") from None
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as error:
        if isinstance(error, AudioReadError):
            raise
        raise AudioReadError(label, f"not decodable as audio ({error})") from None
    if data.shape[0] == 0:
        raise AudioReadError(label, f"no audio frames could be read at frame {start} (the header claims {frames})")
    if not np.isfinite(data).all():
        raise AudioReadError(label, "the file holds NaN or infinite samples")
    # Mix down to mono; a copy makes the tensor own contiguous memory.
    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1), dtype=np.float32))
    if file_rate != sample_rate:
        wave = torchaudio.functional.resample(wave, orig_freq=int(file_rate), new_freq=sample_rate)
    if num_frames is not None:
        wave = fit_length(wave[skip : skip + num_frames], num_frames)  # pads a short read at the end
    return wave.contiguous()


def audio_info(path) -> tuple[int, int]:
    """(frames, sample rate) from a file's header, without decoding it; AudioReadError when unreadable."""
    try:
        info = soundfile.info(os.fspath(path))
    except FileNotFoundError:
        raise AudioFileNotFoundError(path, "no such file") from None
    except (soundfile.LibsndfileError, RuntimeError, OSError, ValueError, TypeError) as error:
        raise AudioReadError(path, f"not decodable as audio ({error})") from None
    return int(info.frames), int(info.samplerate)


def load_audio(path, sample_rate: int = 16000, clip_seconds: float | None = None, mode: str = "eval",
               rng: np.random.Generator | None = None, crop: str = "start") -> torch.Tensor:
    """Read an audio file as mono float32 [T] at `sample_rate`, fitted to `clip_seconds` if given."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if not os.path.exists(path):
        raise AudioFileNotFoundError(path, "no such file")
    if os.path.isdir(path):
        raise AudioReadError(path, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioReadError(path, "the file is empty (0 bytes)")
    return decode_audio(os.fspath(path), sample_rate, clip_seconds, mode, rng, crop, name=path)


def encode_flac(wave: torch.Tensor | np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> bytes:
    """FLAC bytes of a mono wave (values in [-1, 1]); the shard format stores audio this way."""
    buffer = io.BytesIO()
    array = wave.numpy() if isinstance(wave, torch.Tensor) else np.asarray(wave)
    soundfile.write(buffer, np.clip(array, -1.0, 1.0), sample_rate, format="FLAC", subtype=subtype)
    return buffer.getvalue()
