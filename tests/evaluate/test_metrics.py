"""Classification, retrieval and noise metrics on hand-computed examples."""
import math

import numpy as np
import pytest
import torch

from collat.evaluate import metrics

SCORES = [[0.1, 0.5, 0.4], [0.3, 0.2, 0.1], [0.2, 0.2, 0.6]]


@pytest.mark.parametrize("k, expected", [(1, 1 / 3), (2, 2 / 3), (3, 1.0)])
def test_topk_accuracy_hand_computed(k, expected):
    # Rankings: row0 [1, 2, 0], row1 [0, 1, 2], row2 [2, 0, 1] (the 0.2 tie keeps index order).
    targets = [2, 0, 1]
    assert metrics.topk_accuracy(SCORES, targets, k=k) == pytest.approx(expected)
    one_hot = torch.nn.functional.one_hot(torch.tensor(targets), 3)
    assert metrics.topk_accuracy(torch.tensor(SCORES), one_hot, k=k) == pytest.approx(expected)


def test_topk_accuracy_ties_break_by_index():
    constant = np.zeros((4, 5))
    assert metrics.topk_accuracy(constant, [0, 0, 1, 4], k=1) == pytest.approx(0.5)
    assert metrics.topk_accuracy(constant, [0, 0, 1, 4], k=2) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "targets, k, message",
    [
        ([0, 1], 1, "shape"),
        ([0, 1, 3], 1, "class indices"),
        ([0, 1, 2], 0, "k must be"),
        ([0, 1, 2], 4, "k must be"),
        ([[1, 1, 0], [1, 0, 0], [0, 0, 1]], 1, "exactly one positive"),
    ],
)
def test_topk_accuracy_rejects_bad_input(targets, k, message):
    with pytest.raises(ValueError, match=message):
        metrics.topk_accuracy(SCORES, targets, k=k)


def test_mean_average_precision_hand_computed_and_skips_empty_class():
    scores = np.array([[0.9, 0.2, 0.1], [0.8, 0.7, 0.2], [0.3, 0.6, 0.3], [0.1, 0.5, 0.4]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    result = metrics.mean_average_precision(scores, targets, ["dog", "cat", "owl"])
    # dog: ranking +, -, +, -  -> AP = (1/1 + 2/3) / 2. cat: its positive ranks first -> AP = 1.
    assert result.per_class["dog"] == pytest.approx((1 + 2 / 3) / 2)
    assert result.per_class["cat"] == pytest.approx(1.0)
    assert result.value == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert result.skipped == ["owl"]
    assert "owl" in result.note()


def test_mean_average_precision_errors():
    with pytest.raises(ValueError, match="no class has a positive"):
        metrics.mean_average_precision(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="same shape"):
        metrics.mean_average_precision(np.ones((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="multi-hot"):
        metrics.mean_average_precision(np.ones((2, 2)), np.full((2, 2), 0.5))


def test_retrieval_hand_computed():
    # Two clips with two captions each: captions 0, 1 -> clip 0; captions 2, 3 -> clip 1.
    similarity = np.array([[0.9, 0.1, 0.5, 0.3], [0.8, 0.2, 0.1, 0.7]])
    result = metrics.retrieval_metrics(similarity, [0, 0, 1, 1])
    # audio 0 ranks captions [0, 2, 3, 1]: relevant at positions 0 and 3 -> AP = (1/1 + 2/4) / 2.
    # audio 1 ranks captions [0, 3, 1, 2]: relevant at positions 1 and 3 -> AP = (1/2 + 2/4) / 2.
    assert result["audio_to_text/R@1"] == pytest.approx(0.5)
    assert result["audio_to_text/R@5"] == pytest.approx(1.0)
    assert result["audio_to_text/MRR"] == pytest.approx((1 + 1 / 2) / 2)
    assert result["audio_to_text/mAP@10"] == pytest.approx((0.75 + 0.5) / 2)
    # Captions' clip positions: 0, 1, 1, 0.
    assert result["text_to_audio/R@1"] == pytest.approx(0.5)
    assert result["text_to_audio/R@10"] == pytest.approx(1.0)
    assert result["text_to_audio/MRR"] == pytest.approx(0.75)
    assert result["text_to_audio/mAP@10"] == pytest.approx(0.75)


def test_retrieval_map_at_10_cutoff():
    # Clip 0 owns captions 0 and 1; clips 1..11 own captions 2..12. Every other clip ranks its own
    # caption first (AP = 1); clip 0 ranks caption 0 third and caption 1 twelfth (outside the top 10).
    owner = [0, 0] + list(range(1, 12))
    num_captions = len(owner)
    similarity = np.zeros((12, num_captions))
    for clip in range(1, 12):
        similarity[clip, clip + 1] = 1.0
    order = [2, 3, 0, 4, 5, 6, 7, 8, 9, 10, 11, 1, 12]
    for position, caption in enumerate(order):
        similarity[0, caption] = num_captions - position
    result = metrics.retrieval_metrics(similarity, owner)
    assert result["audio_to_text/mAP@10"] == pytest.approx((1 / 3 / 2 + 11) / 12)
    assert result["audio_to_text/R@1"] == pytest.approx(11 / 12)
    assert result["audio_to_text/R@5"] == pytest.approx(1.0)
    assert result["audio_to_text/MRR"] == pytest.approx((1 / 3 + 11) / 12)


def test_retrieval_text_to_audio_beyond_cutoff_scores_zero_map():
    num = 12
    similarity = np.eye(num)[::-1].copy()  # caption t matches clip num-1-t best
    result = metrics.retrieval_metrics(similarity, list(range(num)))
    # Caption t's own clip t has score 0 unless t = num-1-t (never for even num): ranked by index among
    # the zeros after the one best clip, so its position is t + 1 if t < num-1-t else t.
    positions = np.array([t + 1 if t < num - 1 - t else t for t in range(num)], dtype=float)
    assert result["text_to_audio/MRR"] == pytest.approx(np.mean(1 / (positions + 1)))
    assert result["text_to_audio/mAP@10"] == pytest.approx(np.mean(np.where(positions < 10, 1 / (positions + 1), 0)))
    assert result["text_to_audio/R@10"] == pytest.approx(np.mean(positions < 10))


@pytest.mark.parametrize(
    "similarity, owner, message",
    [
        (np.zeros((2, 3)), [0, 1], "entries"),
        (np.zeros((2, 3)), [0, 1, 2], "must index clips"),
        (np.zeros((3, 3)), [0, 0, 1], "clip 2 has no caption"),
        (np.zeros((0, 3)), [0, 0, 0], "non-empty"),
    ],
)
def test_retrieval_rejects_bad_input(similarity, owner, message):
    with pytest.raises(ValueError, match=message):
        metrics.retrieval_metrics(similarity, owner)


def test_waveform_noise_is_reproducible_and_has_the_asked_std():
    wave = torch.zeros(4, 16000)
    noisy = metrics.add_waveform_noise(wave, std=0.1, seed=3)
    assert torch.equal(noisy, metrics.add_waveform_noise(wave, std=0.1, seed=3))
    assert not torch.equal(noisy, metrics.add_waveform_noise(wave, std=0.1, seed=4))
    assert noisy.std().item() == pytest.approx(0.1, rel=0.02)
    assert wave.abs().sum() == 0  # input untouched
    listed = metrics.add_waveform_noise([torch.zeros(100), torch.zeros(50, dtype=torch.float64)], std=0.1)
    assert [w.shape[0] for w in listed] == [100, 50] and listed[1].dtype == torch.float64
    with pytest.raises(ValueError, match="std"):
        metrics.add_waveform_noise(wave, std=-1.0)
    with pytest.raises(TypeError, match="floating point"):
        metrics.add_waveform_noise(torch.zeros(3, dtype=torch.int64))
    assert math.isclose(metrics.add_waveform_noise(wave, std=0.0).abs().sum().item(), 0.0)


def test_retrieval_map_at_10_of_a_clip_with_more_than_10_captions():
    # Clip 0 owns captions 0..11, ranked first to twelfth: its top 10 are all relevant, so AP@10 = 1 (the
    # normaliser is min(relevant, 10), not the 12 relevant captions). Clip 1 owns caption 12, ranked first.
    owner = [0] * 12 + [1]
    similarity = np.zeros((2, 13))
    similarity[0, :12] = np.arange(12, 0, -1)
    similarity[1, 12] = 1.0
    result = metrics.retrieval_metrics(similarity, owner)
    assert result["audio_to_text/mAP@10"] == pytest.approx(1.0)
