"""The inference API's audio rule (collat/model/inference.py): sample rates, long audio as averaged
windows (shared with collat.predict), lazy file reading, dtype=, grad=, template=."""
import copy

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F
import torchaudio

from collat import predict
from collat.model import CoLLAT, CoLLATConfig, inference

SR = 16000
LABELS = ["violin", "dog barking", "rain"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def template_model():
    torch.manual_seed(0)
    return CoLLAT(CoLLATConfig(audio_size="micro", clip_seconds=0.5, interaction_depth=1, interaction_heads=6,
                               context_length=24, fused=False))


@pytest.fixture
def model(template_model):
    return copy.deepcopy(template_model)


def _noise(samples, seed=0, batch=None):
    g = torch.Generator().manual_seed(seed)
    shape = (samples,) if batch is None else (batch, samples)
    return torch.randn(shape, generator=g) * 0.3


def test_split_windows_and_window_count_agree():
    wave = torch.arange(26)
    assert [len(w) for w in inference.split_windows(wave, 10)] == [10, 10, 6]
    assert [len(w) for w in inference.split_windows(wave[:24], 10)] == [10, 10]  # 4 < 10 // 2: dropped
    assert [len(w) for w in inference.split_windows(wave[:4], 10)] == [4]  # the only piece is kept
    assert torch.equal(inference.split_windows(wave, 10)[1], torch.arange(10, 20))
    for window in (1, 2, 7, 10):
        for n in range(1, 40):
            assert inference.window_count(n, window) == len(inference.split_windows(torch.zeros(n), window)), (n, window)


def test_sample_rate_is_resampled(model):
    x48k = _noise(24000, batch=2)  # 0.5 s at 48 kHz
    resampled = torchaudio.functional.resample(x48k, 48000, SR)
    z = model.encode_audio(x48k, sample_rate=48000)
    torch.testing.assert_close(z, model.encode_audio(resampled, sample_rate=16000), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(z, model.encode_audio(x48k), atol=1e-3)  # taken as 16 kHz it is another sound
    torch.testing.assert_close(model.zero_shot(x48k, LABELS, sample_rate=48000), model.zero_shot(resampled, LABELS))
    torch.testing.assert_close(model.conditioning(list(x48k), sample_rate=48000), model.conditioning(resampled))
    torch.testing.assert_close(model.audio_to_text_tokens(x48k[0], sample_rate=48000),
                               model.audio_to_text_tokens(resampled[:1]))
    for bad in (0, -16000, 44100.0):
        with pytest.raises(ValueError, match="sample_rate must be a positive int"):
            model.encode_audio(x48k, sample_rate=bad)


def test_long_audio_is_the_mean_of_its_windows(model):
    window = model.window_samples
    assert window == 8000
    wave = _noise(int(2.6 * window), seed=1)
    pieces = [wave[:window], wave[window : 2 * window], F.pad(wave[2 * window :], (0, window - int(0.6 * window)))]
    per_window = model.encode_audio(torch.stack(pieces))
    expected = F.normalize(per_window.mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(model.encode_audio(wave), expected, rtol=1e-5, atol=1e-6)
    # 2.4 windows: the 0.4-window tail is dropped; a short clip is zero-padded to one window.
    two = F.normalize(model.encode_audio(torch.stack(pieces[:2])).mean(0, keepdim=True), dim=-1)
    torch.testing.assert_close(model.encode_audio(wave[: int(2.4 * window)]), two, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.encode_audio(wave[:3000]), model.encode_audio(F.pad(wave[:3000], (0, 5000))))
    tokens = model.audio_to_text_tokens(wave)
    torch.testing.assert_close(tokens, model.audio_to_text_tokens(torch.stack(pieces)).mean(0, keepdim=True),
                               rtol=1e-5, atol=1e-5)
    # A batch mixing long and short clips equals the clips one by one (windows batched across clips).
    mixed = model.encode_audio([wave, wave[:3000], wave[: int(2.4 * window)]], batch_size=2)
    torch.testing.assert_close(mixed, torch.cat([expected, model.encode_audio(wave[:3000]), two]), rtol=1e-5, atol=1e-6)


def test_predict_scores_long_files_with_the_model_rule(model, tmp_path):
    wave = _noise(int(2.6 * SR * 0.5), seed=2)
    path = tmp_path / "long.wav"
    soundfile.write(path, wave.numpy(), SR, subtype="FLOAT")
    clips, errors = predict.load_clips([str(path)], SR, 0.5, 0.1, 60.0, "windows")
    assert not errors and clips[0][3] == 3
    scores = predict.predict(model, clips, LABELS, multi_label=False)
    torch.testing.assert_close(scores[0], model.zero_shot([str(path)], LABELS)[0])
    cropped, _ = predict.load_clips([str(path)], SR, 0.5, 0.1, 60.0, "crop")
    assert cropped[0][3] == 1 and cropped[0][2].shape[0] == 8000
    torch.testing.assert_close(predict.predict(model, cropped, LABELS, multi_label=True)[0],
                               model.zero_shot(wave[:8000], LABELS, multi_label=True)[0], rtol=1e-4, atol=1e-5)


def test_file_lists_are_read_batch_by_batch(model, tmp_path, monkeypatch):
    paths = []
    for i in range(5):
        paths.append(str(tmp_path / f"{i}.wav"))
        soundfile.write(paths[-1], _noise(8000, seed=i).numpy(), SR, subtype="FLOAT")
    events = []
    real_load, real_frontend = inference.load_audio, model.frontend.forward
    monkeypatch.setattr(inference, "load_audio", lambda path, rate: events.append("read") or real_load(path, rate))
    monkeypatch.setattr(model.frontend, "forward", lambda wave, *a: events.append(f"encode {len(wave)}") or real_frontend(wave, *a))
    z = model.encode_audio(paths, batch_size=2)
    assert events == ["read", "read", "encode 2", "read", "read", "encode 2", "read", "encode 1"]
    torch.testing.assert_close(z, model.encode_audio(torch.stack([_noise(8000, seed=i) for i in range(5)])), rtol=1e-4, atol=1e-5)


def test_dtype_runs_under_autocast(model):
    waves = _noise(8000, batch=2)
    z32 = model.encode_audio(waves)
    z16 = model.encode_audio(waves, dtype=torch.bfloat16)
    assert z16.dtype == torch.float32 and not torch.equal(z16, z32)  # bf16 arithmetic, float32 results
    assert F.cosine_similarity(z16, z32).min() > 0.98
    assert model.zero_shot(waves, LABELS, dtype="bf16").shape == (2, 3)
    with pytest.raises(ValueError, match="dtype must be"):
        model.encode_audio(waves, dtype=torch.int32)


def test_grad_reaches_the_weights(model):
    waves = _noise(8000, batch=2)
    assert not model.encode_audio(waves).requires_grad
    z = model.encode_audio(waves, grad=True)
    assert z.requires_grad
    (z @ model.encode_text(["This is a sound of rain"]).T).sum().backward()
    assert model.audio.ast.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
    assert model.interaction.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text.parameters())  # locked
    assert model.zero_shot(waves, LABELS, grad=True).requires_grad


@pytest.mark.xfail(strict=True, reason="FbankFrontEnd.forward runs under torch.no_grad(): the batched front end "
                                       "that replaces it must let gradients reach the waveform")
def test_grad_reaches_the_waveform(model):
    waves = _noise(8000, batch=2).requires_grad_()
    model.encode_audio(waves, grad=True).sum().backward()
    assert waves.grad is not None and waves.grad.abs().sum() > 0


def test_template(model):
    waves = _noise(8000, batch=2)
    z_a = model.encode_audio(waves)
    z_t = model.encode_text([f"the sound of {label}" for label in LABELS])
    scale = model.logit_scale.detach().exp().clamp(max=100)
    expected = (scale * z_a @ z_t.T).softmax(-1)
    torch.testing.assert_close(model.zero_shot(waves, LABELS, template="the sound of {}"), expected, rtol=1e-5, atol=1e-6)
    default = model.zero_shot(waves, LABELS)
    torch.testing.assert_close(model.zero_shot(waves, LABELS, template="This is a sound of {}"), default)
    assert not torch.allclose(default, expected)
    with pytest.raises(ValueError, match="template must be a str with"):
        model.zero_shot(waves, LABELS, template="no placeholder")


def test_bad_audio_inputs(model, tmp_path):
    with pytest.raises(ValueError, match="audio is empty"):
        model.encode_audio([])
    with pytest.raises(ValueError, match=r"audio\[1\] is empty"):
        model.encode_audio([torch.zeros(8000), torch.zeros(0)])
    with pytest.raises(TypeError, match=r"audio\[0\] must be a floating-point"):
        model.encode_audio(torch.zeros(1, 8000, dtype=torch.int16))
    with pytest.raises(TypeError, match=r"audio\[0\] must be a file path or a 1-D tensor"):
        model.encode_audio([np.zeros(8000)])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.encode_audio(torch.zeros(1, 8000), batch_size=0)
    model.train()
    model.encode_audio(torch.zeros(1, 8000))
    assert model.training  # the mode the call found
