"""CoLLAT: AST audio encoder + token interaction module predicting a locked text encoder's token
embeddings (paper section 3).

    wave --fbank--> AST --proj--> audio tokens --f_at--> h_at [B, N, D_t] --f_t (locked)--> z_a
    text --tokenizer--> ids --E_t--> h_t [B, N, D_t] --f_t (locked, no grad)--> z_t

The training forward (`compute_losses`) and the inference API (`encode_audio`, `zero_shot`, ...) live
here; saving and loading in pretrained.py, the configuration in collat/config.py.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from collat.config import CoLLATConfig
from collat.model import audio as audio_lib
from collat.model import inference
from collat.model import losses as L
from collat.model.interaction import TokenInteraction
from collat.model.pretrained import PretrainedMixin, checkpoint_folder, resolve_dtype
from collat.model.text import LockedTextEncoder, build_text_encoder
from collat.ops import OpSet, op_set


class CoLLAT(PretrainedMixin, nn.Module):
    _keep_in_fp32_modules = ("frontend",)  # from_pretrained(dtype=...) leaves the fbank front end in float32

    def __init__(self, config: CoLLATConfig | None = None, architecture: dict | None = None):
        super().__init__()
        config = config or CoLLATConfig()
        config.validate()
        self.config = config
        architecture = architecture or {}  # the encoders' saved architecture (pretrained.py): no file is read
        self.text: LockedTextEncoder = build_text_encoder(
            config.text_encoder, config.context_length, config.text_checkpoint, config.text_seed, architecture.get("text")
        )
        width = self.text.width
        self.context_length = self.text.context_length
        frames = config.target_frames or audio_lib.frames_for_seconds(config.clip_seconds)
        self.frontend = audio_lib.FbankFrontEnd(frames, config.window_type, mean=config.fbank_mean, std=config.fbank_std)
        self.audio = audio_lib.ASTEncoder(width, frames, config.audio_size, config.audio_checkpoint,
                                          patch_stride=config.patch_stride, architecture=architecture.get("audio"))
        self.interaction = TokenInteraction(
            width, self.context_length, depth=config.interaction_depth, num_heads=config.interaction_heads,
            mlp_ratio=config.interaction_mlp_ratio, seed=config.interaction_seed,
            resample_queries=config.resample_queries, ops=op_set(config.fused),
        )
        self.logit_scale = nn.Parameter(torch.tensor(L.LOGIT_SCALE_INIT))
        self.contrastive = L.ContrastiveLoss(config.local_loss, config.gather_with_grad)

    # ------------------------------------------------------------------ switches
    @property
    def ops(self) -> OpSet:
        return self.interaction.ops

    def set_fused(self, fused: bool) -> None:
        """Switch between the fused ops and the references on the same weights."""
        self.config.fused = fused
        self.interaction.ops = op_set(fused)

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
    # Every audio-taking method follows collat/model/inference.py: tensors at `sample_rate` (resampled to
    # 16 kHz), files at their own rate, read lazily batch by batch; audio longer than clip_seconds is cut
    # into windows of that length (a last piece under half a window dropped unless it is the only one) whose
    # results are averaged; shorter audio is zero-padded. dtype=torch.bfloat16 / float16 runs under autocast;
    # grad=True keeps the graph from the result back to the weights (back to input tensors only through a
    # differentiable audio front end; the fbank front end runs without gradients).
    @property
    def window_samples(self) -> int:
        """Samples of one inference window: the model's clip length at 16 kHz."""
        return int(round(self.config.clip_seconds * self.frontend.sample_rate))

    def _autocast(self, dtype):
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=resolve_dtype(dtype))

    def _window_outputs(self, fn, audio, sample_rate: int, batch_size: int, noise_std: float, noise_seed: int):
        items = inference.audio_items(audio)
        generator = torch.Generator().manual_seed(noise_seed)
        weight_dtype = self.audio.proj.weight.dtype
        for waves, clip_ids in inference.window_batches(items, self.window_samples, batch_size, sample_rate,
                                                        self.frontend.sample_rate, self.device):
            fbank = self.frontend(waves)
            if noise_std > 0:
                fbank = fbank + noise_std * torch.randn(fbank.shape, generator=generator).to(fbank.device)
            yield fn(fbank.to(weight_dtype)).float(), clip_ids

    def _inference(self, fn, audio, sample_rate: int = 16000, batch_size: int = 32, noise_std: float = 0.0,
                   noise_seed: int = 0, dtype=None, grad: bool = False) -> torch.Tensor:
        was_training = self.training
        self.eval()
        try:
            with torch.set_grad_enabled(grad), self._autocast(dtype):
                means = inference.average_by_clip(
                    self._window_outputs(fn, audio, sample_rate, batch_size, noise_std, noise_seed))
        finally:
            self.train(was_training)
        if not means:
            raise ValueError("audio is empty")
        return torch.stack(means)

    def audio_to_text_tokens(self, audio, batch_size: int = 32, noise_std: float = 0.0, noise_seed: int = 0, *,
                             sample_rate: int = 16000, dtype=None, grad: bool = False) -> torch.Tensor:
        """h_at [B, N, D_t]: the predicted token embeddings (eval mode, deterministic; long audio: window mean)."""
        return self._inference(self.audio_tokens_from_fbank, audio, sample_rate, batch_size, noise_std, noise_seed,
                               dtype, grad)

    def encode_audio(self, audio, batch_size: int = 32, noise_std: float = 0.0, noise_seed: int = 0, *,
                     sample_rate: int = 16000, dtype=None, grad: bool = False) -> torch.Tensor:
        """z_a [B, E], L2-normalised. audio: a tensor [B, T] or [T] at `sample_rate`, a list of 1-D tensors,
        file paths (read lazily, any rate). Long audio: the normalised window embeddings are averaged and
        normalised again. noise_std > 0 adds seeded Gaussian noise to the normalised fbank (robustness
        evaluation). grad=True keeps the graph (to the weights; to input tensors only through a differentiable
        front end), e.g. for guidance.
        """
        def fn(fbank):
            return F.normalize(self.text.encode_predicted(self.audio_tokens_from_fbank(fbank)).float(), dim=-1)

        z = self._inference(fn, audio, sample_rate, batch_size, noise_std, noise_seed, dtype, grad)
        return F.normalize(z, dim=-1)

    def encode_text(self, texts: list[str], batch_size: int = 256, *, dtype=None) -> torch.Tensor:
        """z_t [B, E], L2-normalised (no gradients: the text encoder is locked)."""
        outs = []
        with torch.no_grad(), self._autocast(dtype):
            for start in range(0, len(texts), batch_size):
                ids, mask = self.text.tokenize(list(texts[start : start + batch_size]))
                outs.append(F.normalize(self.text.encode_text(ids, mask).float(), dim=-1))
        if not outs:
            raise ValueError("texts is empty")
        return torch.cat(outs, dim=0)

    def conditioning(self, audio, batch_size: int = 32, *, sample_rate: int = 16000, dtype=None,
                     grad: bool = False) -> torch.Tensor:
        """[B, N, W]: the locked text encoder's per-token last hidden states for the predicted tokens
        (for CLIP after ln_final, as latent-diffusion pipelines take prompt embeddings); long audio: window mean."""
        return self._inference(lambda fb: self.text.hidden_predicted(self.audio_tokens_from_fbank(fb)), audio,
                               sample_rate, batch_size, dtype=dtype, grad=grad)

    def zero_shot(self, audio, labels: list[str], multi_label: bool = False, batch_size: int = 32,
                  noise_std: float = 0.0, noise_seed: int = 0, *, template: str | None = None,
                  sample_rate: int = 16000, dtype=None, grad: bool = False) -> torch.Tensor:
        """Scores [B, C] of each label's prompt: collat.prompts' "This is a sound of {label}" by default, or
        `template` with "{}" where the label goes. Long audio is scored by its averaged embedding (encode_audio).

        Single-label: softmax over the labels of exp(t) * cosine (rows sum to 1).
        Multi-label: the raw cosine similarities in [-1, 1] (rank per class, e.g. for mAP).
        """
        if isinstance(labels, str) or not labels:
            raise ValueError("labels must be a non-empty list of class names")
        z_t = self.encode_text([inference.prompt_for(label, template) for label in labels], dtype=dtype)
        z_a = self.encode_audio(audio, batch_size, noise_std, noise_seed, sample_rate=sample_rate, dtype=dtype, grad=grad)
        cosine = z_a @ z_t.T
        if multi_label:
            return cosine
        return (L.clamped_logit_scale(self.logit_scale.detach()).float() * cosine).softmax(dim=-1)


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu", dtype=None) -> CoLLAT:
    """A CoLLAT in eval mode on `device` (weights cast to `dtype` if given), from a checkpoint folder or a
    training run folder."""
    return CoLLAT.from_pretrained(checkpoint_folder(directory), device=device, dtype=dtype)


def noisy_twin_count(fraction: float, local_batch: int, rank: int = 0, world_size: int = 1) -> int:
    """How many clips of this rank's batch get a noisy twin for L_ut: round(fraction * global batch)
    spread over the ranks, so that K ranks together make as many twins as one process would."""
    total = int(round(fraction * local_batch * world_size))
    share = total // world_size + (1 if rank < total % world_size else 0)
    return min(share, local_batch)
