"""The short zero-shot table a training run prints at its end: one figure per evaluation set (top-1 on
single-label sets, macro mAP on multi-label ones), clean and on noisy audio (Gaussian noise on the
waveform, the paper's Table 3a test), computed by the evaluation tasks of tasks.py."""
from __future__ import annotations

import torch

from collat.evaluate.sets import ClipSet
from collat.evaluate.tasks import EvalOptions, evaluate_set

NOISY_SUFFIX = " noisy"


def as_clip_set(name: str, dataset) -> ClipSet:
    """A ClipSet of every item of a map-style data set with `class_names` (items: "wave", "labels")."""
    if isinstance(dataset, ClipSet):
        return dataset
    items = [dataset[i] for i in range(len(dataset))]
    return ClipSet(name, [item["wave"] for item in items], torch.stack([item["labels"] for item in items]),
                   list(dataset.class_names))


def zero_shot_table(model, sets: dict[str, ClipSet], noise_std: float = 0.1, batch_size: int = 64,
                    noise_seed: int = 0) -> dict[str, float]:
    """{"NAME": clean figure, "NAME noisy": the same with waveform noise of std `noise_std`} for each set."""
    options = EvalOptions(tasks=("zero-shot", "noisy"), probes=(), noise_domains=("waveform",), noise_std=noise_std,
                          noise_seed=noise_seed, batch_size=batch_size)
    options.validate()
    table = {}
    for name, clip_set in sets.items():
        result = evaluate_set(model, clip_set, options, log=lambda message: None)
        metric = "zero-shot/mAP" if result["multi_label"] else "zero-shot/top1"
        table[name] = result["conditions"]["clean"][metric]
        table[name + NOISY_SUFFIX] = result["conditions"]["noisy-waveform"][metric]
    return table


def chance_levels(sets: dict[str, ClipSet]) -> dict[str, float]:
    """Top-1 accuracy of a random guess on each single-label set."""
    return {name: 1.0 / len(clip_set.class_names) for name, clip_set in sets.items() if not clip_set.multi_label}


def format_table(untrained: dict, trained: dict, chance: dict | None = None, noise_std: float | None = None) -> str:
    chance = chance or {}
    lines = [f"{'metric':<26} {'untrained':>10} {'trained':>10} {'chance':>8}", "-" * 57]
    for key in trained:
        base = key.removesuffix(NOISY_SUFFIX)
        c = f"{chance[base]:.3f}" if base in chance else "-"
        lines.append(f"{key:<26} {untrained.get(key, float('nan')):>10.3f} {trained[key]:>10.3f} {c:>8}")
    if noise_std is not None:
        lines.append(f"noisy: Gaussian noise of std {noise_std:g} added to the waveform")
    return "\n".join(lines)
