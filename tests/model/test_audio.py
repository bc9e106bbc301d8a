"""The batched fbank front end against torchaudio.compliance.kaldi.fbank (its definition), clip by clip.

Test waves are random AR(1) noise x[t] = 0.97 x[t-1] + e[t] (the spectrum pre-emphasis flattens: kaldi's
own pre-emphasis turns it back into white noise) plus random tones and a DC offset. White noise is not
used for the 1e-3 bound: after pre-emphasis its lowest FFT bins carry ~1e-7 of the frame energy and are
cancellation-dominated, so one rounding of the clip mean moves their log by ~1e-3 (torchaudio in fp32
differs from itself in fp64 by as much there).
"""
import math

import pytest
import torch
import torchaudio

from collat.model import audio as audio_lib
from collat.model.audio import FbankFrontEnd

SR = 16000
WINDOWS = ("hamming", "hanning", "povey", "rectangular", "blackman")


def random_waves(batch, samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    innovations = 0.05 * torch.randn(batch, samples, generator=g, dtype=torch.float64)
    noise = torchaudio.functional.lfilter(innovations, torch.tensor([1.0, -0.97], dtype=torch.float64),
                                          torch.tensor([1.0, 0.0], dtype=torch.float64), clamp=False)
    t = torch.arange(samples, dtype=torch.float64) / SR
    freqs = 50 + 7000 * torch.rand(batch, 3, 1, generator=g, dtype=torch.float64)
    phases = 2 * math.pi * torch.rand(batch, 3, 1, generator=g, dtype=torch.float64)
    tones = (torch.rand(batch, 3, 1, generator=g, dtype=torch.float64) * torch.sin(2 * math.pi * freqs * t + phases)).sum(1)
    offset = torch.randn(batch, 1, generator=g, dtype=torch.float64)  # a DC offset: mean removal must handle it
    return (noise + 0.2 * tones + 0.1 * offset).float()


def kaldi(wave_1d, window_type):
    return torchaudio.compliance.kaldi.fbank((wave_1d - wave_1d.mean())[None], htk_compat=True, sample_frequency=SR,
                                             use_energy=False, window_type=window_type, num_mel_bins=128, dither=0.0,
                                             frame_shift=10)


@pytest.mark.parametrize("window_type", WINDOWS)
@pytest.mark.parametrize("samples", [400, 401, 8037, 64000])
def test_log_mel_matches_torchaudio_clip_by_clip(window_type, samples):
    waves = random_waves(5, samples, seed=samples)
    ours = FbankFrontEnd(target_frames=16, window_type=window_type).log_mel(waves)
    for i, wave in enumerate(waves):
        expected = kaldi(wave, window_type)
        assert ours[i].shape == expected.shape
        assert (ours[i] - expected).abs().max() <= 1e-3, (window_type, samples, i)


def test_cpu_slices_give_the_same_features(monkeypatch):
    """The CPU path goes through the batch in slices of clips; any slicing gives the per-clip values."""
    waves = random_waves(7, 8000, seed=3)
    front = FbankFrontEnd(target_frames=16)
    whole = front.log_mel(waves)
    monkeypatch.setattr(audio_lib, "CPU_SLICE_FRAMES", 100)  # 49 frames a clip: slices of 2 clips, last of 1
    torch.testing.assert_close(front.log_mel(waves), whole, rtol=0, atol=0)
    for i, wave in enumerate(waves):
        assert (whole[i] - kaldi(wave, "hamming")).abs().max() <= 1e-3


@pytest.mark.parametrize("seconds,target", [(0.5, 60), (1.3, 100), (4.0, 400)])
def test_forward_pads_or_crops_then_normalises(seconds, target):
    """Shorter clips are padded at the end with zero fbank frames, longer ones cut after the clip's own
    mean was removed (over the whole clip, as before the crop), then (x - mean) / (2 std)."""
    waves = random_waves(3, int(seconds * SR), seed=target)
    front = FbankFrontEnd(target_frames=target, window_type="hanning")
    ours = front(waves)
    assert ours.shape == (3, target, 128) and ours.dtype == torch.float32
    for i, wave in enumerate(waves):
        ref = kaldi(wave, "hanning")
        ref = torch.nn.functional.pad(ref, (0, 0, 0, max(0, target - ref.shape[0])))[:target]
        expected = (ref - audio_lib.AUDIOSET_MEAN) / (2 * audio_lib.AUDIOSET_STD)
        assert (ours[i] - expected).abs().max() <= 1e-3 / (2 * audio_lib.AUDIOSET_STD)
    if seconds * 100 < target:  # the padded frames hold exactly the normalised zero
        assert (ours[:, -5:] == front.padding_value).all()


def test_front_end_runs_outside_autocast_and_keeps_checkpoints_unchanged():
    waves = random_waves(2, 8000)
    front = FbankFrontEnd(target_frames=50)
    plain = front(waves)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = front(waves)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, plain, rtol=0, atol=0)
    assert front.state_dict() == {}  # window and mel matrix are non-persistent buffers
    assert {name for name, _ in front.named_buffers()} == {"window", "mel_pairs"}


def test_window_definitions_equal_torchaudio():
    from torchaudio.compliance import kaldi as ta_kaldi

    for window_type in WINDOWS:
        expected = ta_kaldi._feature_window_function(window_type, 400, 0.42, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(audio_lib.kaldi_window(window_type, 400), expected, rtol=0, atol=1e-7)


def test_empty_batch_and_errors():
    front = FbankFrontEnd(target_frames=20)
    assert front(torch.zeros(0, 8000)).shape == (0, 20, 128)
    with pytest.raises(ValueError, match="too short"):
        front(torch.zeros(2, 399))
    with pytest.raises(ValueError, match="window_type"):
        FbankFrontEnd(target_frames=20, window_type="kaiser")


@pytest.mark.gpu
def test_cuda_front_end_matches_torchaudio_without_host_sync():
    waves = random_waves(8, 4 * SR)
    front = FbankFrontEnd(target_frames=400).cuda()
    device_waves = waves.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        feats = front(device_waves)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for i, wave in enumerate(waves):
        expected = (kaldi(wave, "hamming")[:400] - audio_lib.AUDIOSET_MEAN) / (2 * audio_lib.AUDIOSET_STD)
        assert (feats[i].cpu() - expected).abs().max() <= 1e-3
