"""Training augmentation of a batch, a pure function of (seed, step, rank, batch): a resumed run augments
every step exactly as an uninterrupted one, without saving any state.

`augmented_inputs(batch, step, config, device)` returns the keyword arguments of the model's training
forward: the waves moved to the device and transformed (mixup, random gain, polarity, time shift,
optional noise), the prompts (mixed clips get "This is a sound of A and B"), and the SpecAugment masks
that CoLLAT.compute_losses applies after the front end. Evaluation and inference never come here.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from collat.config import TrainConfig
from collat.model.audio import SAMPLE_RATE
from collat.model.augment import (
    SpecMasks,
    mix_clips,
    random_gain,
    random_polarity,
    random_time_shift,
)
from collat.prompts import make_prompt


def augmented_inputs(batch: dict, step: int, config: TrainConfig, device: torch.device, rank: int = 0) -> dict:
    """{"wave", "texts", "spec_masks"} for CoLLAT.forward; the batch itself is not modified."""
    wave = batch["wave"].to(device, non_blocking=True)
    texts = list(batch["text"])
    if not config.augment:
        return {"wave": wave, "texts": texts, "spec_masks": None}
    check_augment_config(config)
    seed = [config.seed, step, rank]
    host = random.Random("-".join(map(str, seed)))  # host choices: which clips mix, prompt order
    generator = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    names = batch.get("names") or [[] for _ in texts]
    if config.mixup > 0:
        rows, partners, texts = mixup_pairs(names, texts, config.mixup, config.max_mixup_names, host)
        wave = mix_clips(wave, _index(rows, device), _index(partners, device), generator)
    if config.gain_db > 0:
        wave = random_gain(wave, config.gain_db, generator)
    if config.polarity:
        wave = random_polarity(wave, generator)
    if config.time_shift > 0:
        wave = random_time_shift(wave, int(config.time_shift * SAMPLE_RATE), generator)
    if config.noise_augment > 0:
        wave = add_noise(wave, config, step, generator)
    spec_masks = None
    if config.spec_time_mask > 0 or config.spec_freq_mask > 0:
        spec_masks = SpecMasks.draw(wave.shape[0], config.spec_time_mask, config.spec_freq_mask, generator)
    return {"wave": wave, "texts": texts, "spec_masks": spec_masks}


def mixup_pairs(names: list[list[str]], texts: list[str], probability: float, max_names: int,
                host: random.Random) -> tuple[list[int], list[int], list[str]]:
    """Which clips get mixed with which partner, and the new prompts. A clip with class names is mixed
    with probability `probability` into a random other named clip, where the union of their names has
    at most max_names (so the prompt fits the text context); its prompt lists the union in random order."""
    texts = list(texts)
    rows, partners = [], []
    for i, own in enumerate(names):
        if not own or host.random() >= probability:
            continue
        candidates = [j for j, other in enumerate(names)
                      if j != i and other and len(set(own) | set(other)) <= max_names and set(other) - set(own)]
        if not candidates:
            continue
        j = host.choice(candidates)
        union = list(own) + [name for name in names[j] if name not in own]
        host.shuffle(union)
        rows.append(i)
        partners.append(j)
        texts[i] = make_prompt(union)
    return rows, partners, texts


def add_noise(wave: torch.Tensor, config: TrainConfig, step: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise on a random `noise_augment` fraction of the clips, each with a std uniform in
    [0, current max]; the max ramps linearly from 0 over noise_augment_ramp steps."""
    ramp = 1.0 if config.noise_augment_ramp <= 0 else min(1.0, (step + 1) / config.noise_augment_ramp)
    B = wave.shape[0]
    chosen = torch.rand((B, 1), generator=generator, device=generator.device) < config.noise_augment
    std = torch.rand((B, 1), generator=generator, device=generator.device) * (config.noise_augment_std * ramp)
    noise = torch.randn(wave.shape, generator=generator, device=generator.device, dtype=wave.dtype)
    return wave + torch.where(chosen, std, torch.zeros_like(std)).to(wave.dtype) * noise


def check_augment_config(config: TrainConfig) -> None:
    for name in ("mixup", "noise_augment"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    for name in ("spec_time_mask", "spec_freq_mask", "gain_db", "time_shift", "noise_augment_std",
                 "noise_augment_ramp"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")
    if config.max_mixup_names < 2:
        raise ValueError(f"max_mixup_names must be >= 2 (a mixture has two names), got {config.max_mixup_names}")


def _index(values: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on the device without a blocking copy (pinned host memory on CUDA)."""
    index = torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)
