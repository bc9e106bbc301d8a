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
from collat.model.augment import SpecMasks
from collat.model.interaction import TokenInteraction
from collat.model.pretrained import PretrainedMixin, checkpoint_folder, resolve_dtype
from collat.model.text import LockedTextEncoder, build_text_encoder
from collat.ops import OpSet, op_set

COMPILE_MODES = ("default", "reduce-overhead")


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

    def compute_losses(self, wave: torch.Tensor, texts: list[str], spec_masks: SpecMasks | None = None
                       ) -> dict[str, torch.Tensor]:
        """All three losses for a batch of waves [B, T] (16 kHz, one length) and their prompts.

        Returns loss (weighted total), l_ct, l_cg, l_ut and logit_scale (exp(t), detached). The text side
        comes first (it needs no audio). L_ut's noisy twins are the first round(noisy_fraction * B) clips
        with Gaussian noise of std noise_std on the waveform (or on the normalised fbank, per
        ut_noise_domain); clean clips and twins go through the front end, AST and f_at as ONE batched
        pass. With twins_in_main_losses the twins also enter L_ct (with their clip's prompt) and L_cg (audio
        to text, among the batch's prompts). `spec_masks` (training augmentation) masks each clip's fbank,
        a twin's like its clip's.
        No host sync: counts are Python ints, lengths come from the mask, and matching skips its range check.
        """
        cfg = self.config
        if len(texts) != wave.shape[0]:
            raise ValueError(f"texts must have one prompt per wave: {wave.shape[0]} waves, {len(texts)} texts")
        h_t, z_t, lengths = self.text_targets(texts)
        B = wave.shape[0]
        wants_ut = cfg.lambda_ut > 0 and cfg.noise_std > 0
        wants_twins = cfg.noise_std > 0 and (cfg.lambda_ut > 0 or cfg.twins_in_main_losses)
        k = noisy_twin_count(cfg.noisy_fraction, B, *L.distributed_world()) if wants_twins else 0
        fbank = self.fbank_with_twins(wave.to(self.device, non_blocking=True), k, spec_masks)
        h_all = self.audio_tokens_from_fbank(fbank)
        h_at = h_all[:B].float()

        rows = B + k if cfg.twins_in_main_losses else B  # twins are matched with their clip's prompt
        l_ct, _ = L.cross_token_loss(h_all[:rows].float(), torch.cat([h_t, h_t[: rows - B]]),
                                     torch.cat([lengths, lengths[: rows - B]]), cfg.matching, cfg.metric, self.ops,
                                     check_lengths=False)
        z_a = F.normalize(self.text.encode_predicted(h_all[:rows]).float(), dim=-1)
        logit_scale = L.clamped_logit_scale(self.logit_scale)
        l_cg = self.contrastive(z_a[:B], z_t, logit_scale)
        if rows > B:  # each twin picks its clip's prompt among the batch's (audio -> text), weighted per row
            l_twins = F.cross_entropy(logit_scale * z_a[B:] @ z_t.T, torch.arange(k, device=z_t.device))
            l_cg = (B * l_cg + k * l_twins) / rows
        if wants_ut:  # on every rank, even one without twins: the loss all-reduces its token count
            clean = h_at[:k]
            if cfg.stop_grad_clean:
                clean = clean.detach()
            l_ut = L.unimodal_token_loss(clean, h_all[B:].float(), self.ops)
        else:
            l_ut = h_at.new_zeros(())
        loss = cfg.lambda_ct * l_ct + cfg.lambda_cg * l_cg + cfg.lambda_ut * l_ut
        return {"loss": loss, "l_ct": l_ct, "l_cg": l_cg, "l_ut": l_ut, "logit_scale": logit_scale.detach()}

    def text_targets(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(h_t [B, N, D] fp32, z_t [B, E] normalised, lengths [B]) of the prompts, without gradients."""
        ids, mask = self.text.tokenize(texts)
        with torch.no_grad():
            h_t = self.text.embed(ids).float()
            z_t = F.normalize(self.text.encode_text(ids, mask).float(), dim=-1)
        return h_t, z_t, mask.sum(dim=1)

    def fbank_with_twins(self, wave: torch.Tensor, num_noisy: int, spec_masks: SpecMasks | None = None) -> torch.Tensor:
        """Fbanks [B + num_noisy, frames, mels]: the clips, then noisy twins of the first num_noisy clips."""
        cfg = self.config
        if num_noisy and cfg.ut_noise_domain == "waveform":
            twins = wave[:num_noisy].float() + cfg.noise_std * torch.randn_like(wave[:num_noisy], dtype=torch.float32)
            fbank = self.frontend(torch.cat([wave.float(), twins], dim=0))
        else:
            fbank = self.frontend(wave)
            if num_noisy:
                noisy = fbank[:num_noisy] + cfg.noise_std * torch.randn_like(fbank[:num_noisy])
                fbank = torch.cat([fbank, noisy], dim=0)
        if spec_masks is not None:
            fbank = spec_masks.with_twins(num_noisy).apply(fbank, self.frontend.padding_value)
        return fbank

    def forward(self, wave: torch.Tensor, texts: list[str], spec_masks: SpecMasks | None = None) -> dict[str, torch.Tensor]:
        """The training forward (= compute_losses), so DistributedDataParallel can wrap the model."""
        return self.compute_losses(wave, texts, spec_masks)

    # ------------------------------------------------------------------ training speed options
    def compile_for_training(self, mode: str = "default", backend: str = "inductor") -> None:
        """torch.compile the audio encoder, the interaction module and the text tower's forward in place
        (parameter names and checkpoints are unchanged). mode: "default", or "reduce-overhead" (CUDA
        graphs of the static-shape parts), or "none"; `backend` as torch.compile's (tests use "aot_eager",
        which traces the same graphs without generating code). Fused ops stay inside: they are registered custom
        ops. AST and the interaction compile with fullgraph=True; the text tower allows graph breaks
        (transformers' BERT and open_clip's tower are not written for one graph)."""
        if mode == "none":
            return
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {('none',) + COMPILE_MODES}, got {mode!r}")
        options = {"mode": None if mode == "default" else mode, "backend": backend}
        if backend != "inductor":  # modes are inductor options
            options.pop("mode")
        self.audio.compile(fullgraph=True, **options)
        self.interaction.compile(fullgraph=True, **options)
        self.text.forward_tokens = torch.compile(self.text.forward_tokens, **options)

    def enable_fp8_training(self) -> None:
        """fp8 matmuls for AST's linear layers through torchao's float8 training (dynamic scaling); CUDA
        only, with torchao installed. Parameters stay fp32 (same names), so checkpoints load either way."""
        if self.device.type != "cuda":
            raise RuntimeError(f"fp8 training needs a CUDA GPU (float8 GEMMs); the model is on {self.device}. "
                               "Drop --fp8 or train on a GPU.")
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError as error:
            raise RuntimeError(f"fp8 training needs torchao (`pip install -e '.[fp8]'` or `pip install torchao`): {error}") from None
        capability = torch.cuda.get_device_capability(self.device)
        if capability < (8, 9):
            raise RuntimeError(f"fp8 training needs a GPU of compute capability >= 8.9 (Ada/Hopper), got {capability}")

        def fp8_friendly(module: nn.Module, name: str) -> bool:  # float8 GEMMs want dims divisible by 16
            return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

        convert_to_float8_training(self.audio.ast.encoder, module_filter_fn=fp8_friendly)

    def prepare_training(self, compile_mode: str = "none", fp8: bool = False) -> None:
        """The training speed options of TrainConfig (fp8 first: compilation must see the fp8 layers)."""
        if fp8:
            self.enable_fp8_training()
        self.compile_for_training(compile_mode)

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
