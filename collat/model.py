"""CoLLAT: AST audio encoder + token interaction module predicting a locked text encoder's token
embeddings (paper section 3, DESIGN.md sections 1-2).

    wave --fbank--> AST --proj--> audio tokens --f_at--> h_at [B, N, D_t] --f_t (locked)--> z_a
    text --tokenizer--> ids --E_t--> h_t [B, N, D_t] --f_t (locked, no grad)--> z_t
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from collat import audio as audio_lib
from collat import losses as L
from collat.fileio import atomic_write, atomic_write_text
from collat.interaction import TokenInteraction
from collat.prompts import make_prompt
from collat.text import LockedTextEncoder, build_text_encoder

ARCHITECTURE = "CoLLAT"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def dataclass_from_dict(cls, values: dict):
    """cls(**values), refusing unknown keys with a message that lists the known ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return cls(**values)


@dataclass
class CoLLATConfig:
    # Locked text encoder: "all-MiniLM-L6-v2" or "clip:<open_clip model>", e.g. "clip:ViT-B-32".
    text_encoder: str = "all-MiniLM-L6-v2"
    text_checkpoint: str | None = None  # MiniLM model dir or CLIP checkpoint file; None = packaged/random
    # N. None = the encoder's default: 24 for MiniLM (the longest 3-label prompt of the embedded data
    # set needs 17-19 tokens), 77 (fixed) for CLIP.
    context_length: int | None = None
    text_seed: int = 0  # seed of random CLIP weights when no checkpoint is given
    # Audio encoder.
    audio_size: str = "tiny"  # micro (64, 1 layer; tests) | tiny (192, 4) | small (384, 12) | base (768, 12)
    audio_checkpoint: str | None = None  # local AST checkpoint directory (transformers layout)
    clip_seconds: float = 4.0
    # Patch stride in both directions (paper and AST: 10, i.e. 16x16 patches overlapping by 6; ignored
    # when a pretrained AST checkpoint is loaded, which brings its own).
    patch_stride: int = 10
    # fbank frames the clip is padded/cropped to; None = clip_seconds * 100 (AST pads 10 s to 1024 -> 1212 patches)
    target_frames: int | None = None
    window_type: str = "hamming"  # paper; use "hanning" with a pretrained AST checkpoint
    fbank_mean: float = audio_lib.AUDIOSET_MEAN
    fbank_std: float = audio_lib.AUDIOSET_STD
    # Token interaction module f_at.
    interaction_depth: int = 8
    interaction_heads: int = 8
    interaction_mlp_ratio: float = 4.0
    interaction_seed: int = 0
    resample_queries: bool = False
    # Ops: fused (collat.ops: compiled/Triton kernels, each with a fallback) or the plain references.
    fused: bool = True
    matching: str = "greedy"  # greedy (paper) | optimal (exact assignment)
    metric: str = "l1"
    # Loss weights (paper: 1, 0.1, 0.01).
    lambda_ct: float = 1.0
    lambda_cg: float = 0.1
    lambda_ut: float = 0.01
    # L_ut: noise on the normalised fbank, the fraction of the batch that gets a noisy twin (paper: 1.0),
    # and whether the clean branch is a stop-gradient target.
    noise_std: float = 0.1
    noisy_fraction: float = 1.0
    stop_grad_clean: bool = False
    # L_cg across ranks (open_clip's ClipLoss options).
    local_loss: bool = False
    gather_with_grad: bool = True

    def validate(self) -> None:
        if self.matching not in L.MATCHINGS:
            raise ValueError(f"matching must be one of {L.MATCHINGS}, got {self.matching!r}")
        if self.metric not in ("l1", "l2", "cosine"):
            raise ValueError(f"metric must be l1, l2 or cosine, got {self.metric!r}")
        if not 0.0 <= self.noisy_fraction <= 1.0:
            raise ValueError(f"noisy_fraction must be in [0, 1], got {self.noisy_fraction}")
        if not 1 <= self.patch_stride <= 16:
            raise ValueError(f"patch_stride must be in [1, 16] (patches are 16x16), got {self.patch_stride}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.clip_seconds <= 0.2:
            raise ValueError(f"clip_seconds must be > 0.2, got {self.clip_seconds}")

    @property
    def num_frames(self) -> int:
        return self.target_frames or audio_lib.frames_for_seconds(self.clip_seconds)

    @classmethod
    def from_dict(cls, values: dict) -> "CoLLATConfig":
        return dataclass_from_dict(cls, values)


class CoLLAT(nn.Module):
    def __init__(self, config: CoLLATConfig | None = None):
        super().__init__()
        config = config or CoLLATConfig()
        config.validate()
        self.config = config
        self.text: LockedTextEncoder = build_text_encoder(
            config.text_encoder, config.context_length, config.text_checkpoint, config.text_seed
        )
        width = self.text.width
        self.context_length = self.text.context_length
        self.frontend = audio_lib.FbankFrontEnd(
            config.num_frames, config.window_type, mean=config.fbank_mean, std=config.fbank_std
        )
        self.audio = audio_lib.ASTEncoder(
            width, config.num_frames, config.audio_size, config.audio_checkpoint, patch_stride=config.patch_stride
        )
        interaction_kwargs = dict(
            depth=config.interaction_depth,
            num_heads=config.interaction_heads,
            mlp_ratio=config.interaction_mlp_ratio,
            seed=config.interaction_seed,
            resample_queries=config.resample_queries,
        )
        if "fused" in inspect.signature(TokenInteraction.__init__).parameters:
            interaction_kwargs["fused"] = config.fused
        self.interaction = TokenInteraction(width, self.context_length, **interaction_kwargs)
        self.logit_scale = nn.Parameter(torch.tensor(L.LOGIT_SCALE_INIT))
        self.contrastive = L.ContrastiveLoss(config.local_loss, config.gather_with_grad)

    # ------------------------------------------------------------------ switches
    @property
    def ops(self) -> str:
        return "fused" if self.config.fused else "reference"

    def set_fused(self, fused: bool) -> None:
        """Switch between the fused ops and the references on the same weights."""
        self.config.fused = fused
        if hasattr(self.interaction, "fused"):
            self.interaction.fused = fused

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def locked_text_state(self) -> dict[str, torch.Tensor]:
        """Clones of every text-encoder tensor, to verify that training leaves it bit-identical."""
        return {k: v.detach().clone() for k, v in self.text.state_dict().items()}

    # ------------------------------------------------------------------ forward pieces
    def audio_tokens_from_fbank(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.interaction(self.audio(fbank))

    def compute_losses(self, wave: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        """All three losses for a batch of waves [B, T] (16 kHz) and their prompts.

        Returns loss (weighted total), l_ct, l_cg, l_ut and logit_scale (exp(t), detached).
        The clean and noisy fbanks go through AST and f_at as ONE batched pass.
        """
        cfg = self.config
        if len(texts) != wave.shape[0]:
            raise ValueError(f"texts must have one prompt per wave: {wave.shape[0]} waves, {len(texts)} texts")
        fbank = self.frontend(wave.to(self.device))
        B = fbank.shape[0]
        wants_ut = cfg.lambda_ut > 0 and cfg.noise_std > 0
        num_noisy = noisy_twin_count(cfg.noisy_fraction, B, *L.distributed_world()) if wants_ut else 0
        if num_noisy:
            noisy = fbank[:num_noisy] + cfg.noise_std * torch.randn_like(fbank[:num_noisy])
            fbank = torch.cat([fbank, noisy], dim=0)
        h_all = self.audio_tokens_from_fbank(fbank)
        h_at = h_all[:B].float()

        ids, mask = self.text.tokenize(texts)
        with torch.no_grad():
            h_t = self.text.embed(ids).float()
            z_t = F.normalize(self.text.encode_text(ids, mask).float(), dim=-1)
        lengths = mask.sum(dim=1)

        l_ct, _ = L.cross_token_loss(h_at, h_t, lengths, cfg.matching, cfg.metric, self.ops)
        z_a = F.normalize(self.text.encode_predicted(h_all[:B]).float(), dim=-1)
        logit_scale = L.clamped_logit_scale(self.logit_scale)
        l_cg = self.contrastive(z_a, z_t, logit_scale)
        if wants_ut:  # on every rank, even one without twins: the loss all-reduces its token count
            clean = h_at[:num_noisy]
            if cfg.stop_grad_clean:
                clean = clean.detach()
            l_ut = L.unimodal_token_loss(clean, h_all[B:].float(), self.ops)
        else:
            l_ut = h_at.new_zeros(())
        loss = cfg.lambda_ct * l_ct + cfg.lambda_cg * l_cg + cfg.lambda_ut * l_ut
        return {"loss": loss, "l_ct": l_ct, "l_cg": l_cg, "l_ut": l_ut, "logit_scale": logit_scale.detach()}

    def forward(self, wave: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        """The training forward (= compute_losses), so DistributedDataParallel can wrap the model."""
        return self.compute_losses(wave, texts)

    # ------------------------------------------------------------------ inference
    def _waves(self, audio) -> list[torch.Tensor]:
        """Normalise the accepted audio inputs to a list of 1-D float tensors at 16 kHz."""
        if isinstance(audio, torch.Tensor):
            if audio.dim() == 1:
                audio = audio[None]
            if audio.dim() != 2:
                raise ValueError(f"audio tensor must have shape [B, T] or [T] (16 kHz mono), got {tuple(audio.shape)}")
            return list(audio)
        if isinstance(audio, (str, os.PathLike)):
            audio = [audio]
        if not isinstance(audio, (list, tuple)):
            raise TypeError(f"audio must be a tensor [B, T], a list of 1-D tensors or a list of file paths, got {type(audio).__name__}")
        waves = []
        for i, item in enumerate(audio):
            if isinstance(item, (str, os.PathLike)):
                waves.append(audio_lib.load_audio_file(os.fspath(item), self.frontend.sample_rate))
            elif isinstance(item, torch.Tensor):
                if item.dim() != 1:
                    raise ValueError(f"audio[{i}] must be a 1-D waveform, got shape {tuple(item.shape)}")
                waves.append(item)
            else:
                raise TypeError(f"audio[{i}] must be a file path or a 1-D tensor, got {type(item).__name__}")
        return waves

    def _fbank_batches(self, audio, batch_size: int, noise_std: float = 0.0, noise_seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        waves = self._waves(audio)
        generator = torch.Generator().manual_seed(noise_seed)
        for start in range(0, len(waves), batch_size):
            chunk = waves[start : start + batch_size]
            fbank = torch.stack([self.frontend(w.float().cpu())[0] for w in chunk]) if chunk else None
            if noise_std > 0:
                fbank = fbank + noise_std * torch.randn(fbank.shape, generator=generator)
            yield fbank.to(self.device)

    def _inference(self, fn, audio, batch_size: int, noise_std: float = 0.0, noise_seed: int = 0) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                outs = [fn(fbank) for fbank in self._fbank_batches(audio, batch_size, noise_std, noise_seed)]
        finally:
            self.train(was_training)
        if not outs:
            raise ValueError("audio is empty")
        return torch.cat(outs, dim=0)

    def audio_to_text_tokens(self, audio, batch_size: int = 32, noise_std: float = 0.0, noise_seed: int = 0) -> torch.Tensor:
        """h_at [B, N, D_t]: the predicted token embeddings (eval mode, no grad, deterministic)."""
        return self._inference(lambda fb: self.audio_tokens_from_fbank(fb).float(), audio, batch_size, noise_std, noise_seed)

    def encode_audio(self, audio, batch_size: int = 32, noise_std: float = 0.0, noise_seed: int = 0) -> torch.Tensor:
        """z_a [B, E], L2-normalised. audio: tensor [B, T] at 16 kHz, list of 1-D tensors, or file paths.

        noise_std > 0 adds seeded Gaussian noise to the normalised fbank (the robustness evaluation).
        """
        def fn(fbank):
            return F.normalize(self.text.encode_predicted(self.audio_tokens_from_fbank(fbank)).float(), dim=-1)

        return self._inference(fn, audio, batch_size, noise_std, noise_seed)

    @torch.no_grad()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """z_t [B, E], L2-normalised."""
        outs = []
        for start in range(0, len(texts), batch_size):
            ids, mask = self.text.tokenize(list(texts[start : start + batch_size]))
            outs.append(F.normalize(self.text.encode_text(ids, mask).float(), dim=-1))
        if not outs:
            raise ValueError("texts is empty")
        return torch.cat(outs, dim=0)

    def conditioning(self, audio, batch_size: int = 32) -> torch.Tensor:
        """[B, N, W]: the locked text encoder's per-token last hidden states for the predicted tokens
        (for CLIP after ln_final, as latent-diffusion pipelines take prompt embeddings)."""
        return self._inference(lambda fb: self.text.hidden_predicted(self.audio_tokens_from_fbank(fb)).float(), audio, batch_size)

    def zero_shot(self, audio, labels: list[str], multi_label: bool = False, batch_size: int = 32,
                  noise_std: float = 0.0, noise_seed: int = 0) -> torch.Tensor:
        """Scores [B, C] against the prompts "This is a sound of {label}".

        Single-label: softmax over the labels of exp(t) * cosine (rows sum to 1).
        Multi-label: the raw cosine similarities in [-1, 1] (rank per class, e.g. for mAP).
        """
        if isinstance(labels, str) or not labels:
            raise ValueError("labels must be a non-empty list of class names")
        z_t = self.encode_text([make_prompt([label]) for label in labels])
        z_a = self.encode_audio(audio, batch_size, noise_std, noise_seed)
        cosine = z_a @ z_t.T
        if multi_label:
            return cosine
        return (L.clamped_logit_scale(self.logit_scale.detach()).float() * cosine).softmax(dim=-1)

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.config)}

    def save_pretrained(self, directory: str) -> None:
        """config.json + model.safetensors, each written to a temp file then os.replace'd."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda path: save_file(state, path, metadata={"format": "pt"}))
        payload = json.dumps(self.config_dict(), indent=2)
        atomic_write_text(os.path.join(directory, CONFIG_NAME), payload)

    @classmethod
    def read_config(cls, directory: str) -> CoLLATConfig:
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint directory not found: {directory}")
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a CoLLAT checkpoint?")
        with open(path) as f:
            payload = json.load(f)
        arch = payload.get("architecture")
        if arch != ARCHITECTURE:
            raise ValueError(f"{directory} holds a {arch!r} checkpoint, not {ARCHITECTURE!r}")
        version = payload.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{directory} has checkpoint format version {version}, this collat reads version {FORMAT_VERSION}")
        return CoLLATConfig.from_dict(payload["config"])

    @classmethod
    def from_pretrained(cls, directory: str, map_location=None) -> "CoLLAT":
        from safetensors.torch import load_file

        config = cls.read_config(directory)
        weights = os.path.join(directory, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}")
        model = cls(config)
        model.load_weights(load_file(weights))
        model.eval()
        if map_location is not None:
            model.to(map_location)
        return model

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = [k for k in expected if k in state and expected[k].shape != state[k].shape]
        if missing or unexpected or shapes:
            raise ValueError(
                "checkpoint does not match this CoLLAT architecture: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
                f"{len(shapes)} with another shape (e.g. {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in shapes[:3]]})"
            )
        self.load_state_dict(state)


def noisy_twin_count(fraction: float, local_batch: int, rank: int = 0, world_size: int = 1) -> int:
    """How many clips of this rank's batch get a noisy twin for L_ut: round(fraction * global batch)
    spread over the ranks, so that K ranks together make as many twins as one process would."""
    total = int(round(fraction * local_batch * world_size))
    share = total // world_size + (1 if rank < total % world_size else 0)
    return min(share, local_batch)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = ["CoLLAT", "CoLLATConfig", "make_prompt", "count_parameters"]

