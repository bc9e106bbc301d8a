"""Evaluation metrics for classification, retrieval and robustness (paper Tables 2 and 3).

Every function takes torch tensors or numpy arrays and returns plain Python floats (or a small
dataclass), so results go straight into JSON. Ties in a ranking are broken by index (a stable sort:
the lower class / item index ranks first), which keeps results deterministic and never lets a
constant-scoring model look better than chance by more than the index order allows.

Definitions
-----------
top-k accuracy (single-label)
    fraction of clips whose true class is among the k highest-scoring classes.
macro mAP (multi-label)
    mean over classes of sklearn's ``average_precision_score`` of that class's column; a class with
    no positive clip in the evaluated set has no defined AP and is skipped (and reported).
retrieval (audio -> text and text -> audio)
    LAION-CLAP / WavCaps protocol (X. Mei's audio-text_retrieval ``tools/utils.py``): a clip may have
    several captions, every caption belongs to exactly one clip. With 0-based rank positions:
    - text -> audio: each caption is a query with exactly one relevant clip at position p.
      R@k = mean[p < k], MRR = mean 1/(p+1), mAP@10 = mean[p < 10] / (p+1).
    - audio -> text: each clip is a query with R relevant captions at sorted positions
      p_1 < p_2 < ... . R@k and MRR use the best position p_1. AP@10 = sum over relevant captions
      within the top 10 of i / (p_i + 1), divided by min(R, 10) (WavCaps divides by R = 5, which is the
      same thing whenever a clip has at most 10 captions); mAP@10 is its mean over clips.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

RETRIEVAL_KS = (1, 5, 10)
MAP_CUTOFF = 10


def _as_numpy(x, name: str, ndim: int | None = None, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.double() if dtype == np.float64 else x
        x = x.numpy()
    array = np.asarray(x, dtype=dtype)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(array.shape)}")
    return array


def _descending_order(scores: np.ndarray) -> np.ndarray:
    # Stable sort of the negated scores: equal scores keep index order.
    return np.argsort(-scores, axis=-1, kind="stable")


def _rank_positions(scores: np.ndarray) -> np.ndarray:
    """positions[q, i] = 0-based rank of item i in query q's descending ranking."""
    order = _descending_order(scores)
    positions = np.empty_like(order)
    rows = np.arange(scores.shape[0])[:, None]
    positions[rows, order] = np.arange(scores.shape[1])[None, :]
    return positions


def _single_label_targets(targets, num_clips: int, num_classes: int) -> np.ndarray:
    array = _as_numpy(targets, "targets", dtype=np.float64)
    if array.ndim == 2:
        if array.shape != (num_clips, num_classes):
            raise ValueError(
                f"multi-hot targets must have shape {(num_clips, num_classes)}, got {tuple(array.shape)}"
            )
        positives = (array > 0).sum(1)
        if not np.all(positives == 1):
            bad = int(np.flatnonzero(positives != 1)[0])
            raise ValueError(
                f"single-label accuracy needs exactly one positive per clip; clip {bad} has {int(positives[bad])}"
            )
        return array.argmax(1)
    if array.ndim != 1 or array.shape[0] != num_clips:
        raise ValueError(f"targets must be class indices of shape ({num_clips},), got {tuple(array.shape)}")
    if np.any(array != np.round(array)) or np.any(array < 0) or np.any(array >= num_classes):
        raise ValueError(f"targets must be integer class indices in [0, {num_classes}), got {array.tolist()[:10]}")
    return array.astype(np.int64)


def topk_accuracy(scores, targets, k: int = 1) -> float:
    """Fraction of clips whose true class is among the ``k`` best-scoring classes.

    scores: [B, C]; targets: class indices [B] or one-hot [B, C] (exactly one positive per row).
    """
    scores = _as_numpy(scores, "scores", ndim=2)
    num_clips, num_classes = scores.shape
    if num_clips == 0:
        raise ValueError("scores has no clips (B = 0): accuracy is undefined")
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}] (the number of classes), got {k}")
    target_index = _single_label_targets(targets, num_clips, num_classes)
    top = _descending_order(scores)[:, :k]
    return float((top == target_index[:, None]).any(1).mean())


@dataclass
class MAPResult:
    """Macro mAP over the classes that have at least one positive clip."""

    value: float
    per_class: dict[str, float]
    skipped: list[str] = field(default_factory=list)

    def note(self) -> str:
        if not self.skipped:
            return f"mAP over all {len(self.per_class)} classes"
        return (
            f"mAP over {len(self.per_class)} classes; skipped {len(self.skipped)} class(es) with no positive "
            f"clip: {', '.join(self.skipped)}"
        )


def mean_average_precision(scores, targets, class_names: Sequence[str] | None = None) -> MAPResult:
    """Macro mAP: the mean of sklearn's ``average_precision_score`` over classes (columns).

    scores: [B, C] real scores (higher = more likely); targets: multi-hot [B, C]. A class without a
    positive clip has no defined AP; it is skipped and listed in ``MAPResult.skipped``.
    """
    from sklearn.metrics import average_precision_score

    scores = _as_numpy(scores, "scores", ndim=2)
    targets = _as_numpy(targets, "targets", ndim=2)
    if scores.shape != targets.shape:
        raise ValueError(f"scores and targets must have the same shape, got {scores.shape} and {targets.shape}")
    if not np.all((targets == 0) | (targets == 1)):
        raise ValueError("targets must be multi-hot (0/1 entries)")
    num_classes = scores.shape[1]
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names for {num_classes} score columns")
    per_class, skipped = {}, []
    for c, name in enumerate(names):
        if targets[:, c].sum() == 0:
            skipped.append(name)
            continue
        per_class[name] = float(average_precision_score(targets[:, c], scores[:, c]))
    if not per_class:
        raise ValueError("mAP is undefined: no class has a positive clip in targets")
    return MAPResult(float(np.mean(list(per_class.values()))), per_class, skipped)


def retrieval_metrics(similarity, caption_to_audio) -> dict[str, float]:
    """Audio->text and text->audio retrieval (definitions in the module docstring).

    similarity: [A, T] scores between A clips and T captions (e.g. cosine of normalised embeddings).
    caption_to_audio: [T] integer index of the clip each caption describes; every clip needs >= 1.
    Returns keys ``audio_to_text/R@1`` ... ``audio_to_text/mAP@10``, ``audio_to_text/MRR`` and the
    same for ``text_to_audio``.
    """
    similarity = _as_numpy(similarity, "similarity", ndim=2)
    owner = _as_numpy(caption_to_audio, "caption_to_audio", ndim=1, dtype=np.int64)
    num_audio, num_text = similarity.shape
    if num_audio == 0 or num_text == 0:
        raise ValueError(f"similarity must be non-empty, got shape {similarity.shape}")
    if owner.shape[0] != num_text:
        raise ValueError(f"caption_to_audio has {owner.shape[0]} entries for {num_text} captions")
    if owner.min() < 0 or owner.max() >= num_audio:
        raise ValueError(f"caption_to_audio must index clips in [0, {num_audio}), got range [{owner.min()}, {owner.max()}]")
    captions_per_audio = np.bincount(owner, minlength=num_audio)
    if np.any(captions_per_audio == 0):
        raise ValueError(f"clip {int(np.flatnonzero(captions_per_audio == 0)[0])} has no caption")

    results: dict[str, float] = {}

    # text -> audio: one relevant clip per caption.
    t2a_pos = _rank_positions(similarity.T)[np.arange(num_text), owner].astype(np.float64)
    for k in RETRIEVAL_KS:
        results[f"text_to_audio/R@{k}"] = float(np.mean(t2a_pos < k))
    results["text_to_audio/MRR"] = float(np.mean(1.0 / (t2a_pos + 1)))
    results[f"text_to_audio/mAP@{MAP_CUTOFF}"] = float(np.mean(np.where(t2a_pos < MAP_CUTOFF, 1.0 / (t2a_pos + 1), 0.0)))

    # audio -> text: several relevant captions per clip.
    a2t_positions = _rank_positions(similarity)
    best, average_precision = np.empty(num_audio), np.empty(num_audio)
    for a in range(num_audio):
        relevant = np.sort(a2t_positions[a, owner == a])
        best[a] = relevant[0]
        within = relevant[relevant < MAP_CUTOFF]
        hits = np.arange(1, len(within) + 1)
        average_precision[a] = np.sum(hits / (within + 1)) / min(len(relevant), MAP_CUTOFF)
    for k in RETRIEVAL_KS:
        results[f"audio_to_text/R@{k}"] = float(np.mean(best < k))
    results["audio_to_text/MRR"] = float(np.mean(1.0 / (best + 1)))
    results[f"audio_to_text/mAP@{MAP_CUTOFF}"] = float(np.mean(average_precision))
    return results


def add_waveform_noise(audio, std: float = 0.1, seed: int = 0):
    """Adds zero-mean Gaussian noise of ``std`` to waveforms, reproducibly (paper Table 3a "noisy").

    Where the noise goes: the paper says only "Gaussian noise with zero mean and 0.1 standard
    deviation" for its noisy test audio. Training's L_ut adds its noise to the *normalised fbank*;
    for evaluation we add it to the *waveform* by default, because that is what noisy audio means to a
    user and it is independent of the model's front end, so every ablation row sees the same input.
    (collat.evaluate also offers the fbank domain, matching L_ut's training noise.)

    audio: a [B, T] tensor or a list of 1-D tensors. The same seed gives the same noise, so every
    model in a comparison is evaluated on identical noisy clips.
    """
    if std < 0:
        raise ValueError(f"std must be >= 0, got {std}")
    generator = torch.Generator().manual_seed(seed)

    def noisy(wave: torch.Tensor) -> torch.Tensor:
        wave = torch.as_tensor(wave)
        if not torch.is_floating_point(wave):
            raise TypeError(f"audio must be floating point, got {wave.dtype}")
        noise = torch.randn(wave.shape, generator=generator, dtype=torch.float32)
        return wave + (std * noise).to(device=wave.device, dtype=wave.dtype)

    if isinstance(audio, torch.Tensor):
        return noisy(audio)
    if isinstance(audio, (list, tuple)):
        return [noisy(w) for w in audio]
    raise TypeError(f"audio must be a tensor or a list of 1-D tensors, got {type(audio).__name__}")
