"""What the evaluations measure a model on: its clip embeddings and per-token features, clean or with
seeded Gaussian noise, and the prompt embeddings of the classes."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from collat.evaluate import metrics
from collat.prompts import class_prompts

NOISE_DOMAINS = ("waveform", "fbank")


@dataclass
class Noise:
    """Seeded Gaussian noise of `std` on the waveform or on the normalised fbank."""

    domain: str
    std: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.domain not in NOISE_DOMAINS:
            raise ValueError(f"noise domain must be one of {NOISE_DOMAINS}, got {self.domain!r}")
        if self.std < 0:
            raise ValueError(f"noise std must be >= 0, got {self.std}")

    @property
    def name(self) -> str:
        return f"noisy-{self.domain}"


def extract_features(model, waves: list[torch.Tensor], batch_size: int = 32, noise: Noise | None = None,
                     conditioning: bool = False) -> dict[str, torch.Tensor]:
    """One audio pass per clip: {"embedding": z_a [B, E] (L2-normalised), "conditioning": [B, N, W]}.

    Equal to model.encode_audio / model.conditioning (tested), but the audio encoder runs once for both.
    """
    if noise is not None and noise.domain == "waveform":
        waves = metrics.add_waveform_noise(waves, noise.std, noise.seed)
    fbank_std = noise.std if noise is not None and noise.domain == "fbank" else 0.0
    seed = noise.seed if noise is not None else 0
    h_at = model.audio_to_text_tokens(waves, batch_size=batch_size, noise_std=fbank_std, noise_seed=seed)
    embeddings, hidden = [], []
    with torch.no_grad():
        for start in range(0, h_at.shape[0], batch_size):
            chunk = h_at[start : start + batch_size].to(model.device)
            embeddings.append(F.normalize(model.text.encode_predicted(chunk).float(), dim=-1).cpu())
            if conditioning:
                hidden.append(model.text.hidden_predicted(chunk).float().cpu())
    out = {"embedding": torch.cat(embeddings)}
    if conditioning:
        out["conditioning"] = torch.cat(hidden)
    return out


def class_prompt_embeddings(model, class_names: list[str]) -> torch.Tensor:
    """z_t of "This is a sound of {label}" for every class, as model.zero_shot builds them."""
    return model.encode_text(class_prompts(class_names)).cpu()
