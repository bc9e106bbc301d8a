"""The model and training configurations, and the presets: the one place where a default lives.

`CoLLATConfig` holds the paper's method (8 interaction blocks, loss weights 1 / 0.1 / 0.01, a noisy twin
for every clip) on the small encoders that run offline (MiniLM, a tiny AST). The presets in
collat/configs/*.json list what differs from these defaults, with the reasons in that folder's README:
`cpu` (the no-argument run of `python -m collat.train`) and `paper` (the paper's sizes, for a GPU).
Every field carries its help text, from which the command line is generated.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

from collat.ops import MATCHINGS, METRICS, Matching, Metric

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")


def _field(default, help: str, **metadata):
    return field(default=default, metadata={"help": help, **metadata})


@dataclass
class CoLLATConfig:
    """The model: encoders, token interaction module, ops and losses."""

    text_encoder: str = _field("all-MiniLM-L6-v2", "locked text encoder: all-MiniLM-L6-v2, or clip:<open_clip "
                               "model> such as clip:ViT-B-32")
    text_checkpoint: Optional[str] = _field(None, "MiniLM model folder or open_clip checkpoint file (default: the "
                                            "packaged MiniLM; random CLIP weights)")
    context_length: Optional[int] = _field(None, "text tokens N (default: 24 for MiniLM, 77 for CLIP)")
    text_seed: int = _field(0, "seed of random CLIP weights when no checkpoint is given")
    audio_size: Literal["micro", "tiny", "small", "base"] = _field(
        "tiny", "AST size: micro (64 wide, 1 layer; tests), tiny (192, 4), small (384, 12), base (768, 12)")
    audio_checkpoint: Optional[str] = _field(None, "local AST checkpoint folder (transformers layout)")
    clip_seconds: float = _field(4.0, "clip length in seconds (longer clips are cut, shorter ones padded)")
    patch_stride: int = _field(10, "AST patch stride in both directions (16x16 patches; the paper and AST use 10)")
    target_frames: Optional[int] = _field(None, "fbank frames a clip is padded or cut to (default: 100 a second)")
    window_type: Literal["hamming", "hanning", "povey", "rectangular", "blackman"] = _field(
        "hamming", "fbank window (the paper: hamming; pretrained AST checkpoints: hanning)")
    fbank_mean: float = _field(AUDIOSET_MEAN, "fbank normalisation mean (AudioSet's)")
    fbank_std: float = _field(AUDIOSET_STD, "fbank normalisation std (AudioSet's); features are (x - mean) / (2 std)")
    interaction_depth: int = _field(8, "token interaction blocks", aliases=["--depth"])
    interaction_heads: int = _field(8, "attention heads of each interaction block")
    interaction_mlp_ratio: float = _field(4.0, "MLP width of an interaction block, as a multiple of the text width")
    interaction_seed: int = _field(0, "seed of the fixed N(0, 1) query vectors")
    resample_queries: bool = _field(False, "draw fresh query vectors at every training step")
    fused: bool = _field(True, "fused kernels (compiled matching, Triton loss and attention) instead of the "
                         "plain-PyTorch references")
    matching: Matching = _field("greedy", "token matching: greedy right-to-left (the paper's) "
                                                    "or the optimal assignment")
    metric: Metric = _field("l1", "token distance used by the matching")
    lambda_ct: float = _field(1.0, "weight of the token loss L_ct")
    lambda_cg: float = _field(0.1, "weight of the global contrastive loss L_cg")
    lambda_ut: float = _field(0.01, "weight of the noise-robustness loss L_ut")
    noise_std: float = _field(0.1, "std of the Gaussian noise of L_ut's noisy twins (on the waveform, or on the "
                              "normalised fbank: see ut_noise_domain)")
    noisy_fraction: float = _field(1.0, "fraction of the batch that gets a noisy twin for L_ut")
    stop_grad_clean: bool = _field(False, "stop the gradient of L_ut through the clean branch")
    ut_noise_domain: Literal["waveform", "fbank"] = _field(
        "waveform", "where L_ut's noise goes: the waveform (the paper's noisy audio) or the normalised fbank")
    twins_in_main_losses: bool = _field(False, "noisy twins also enter L_ct and L_cg with their clip's prompt: the "
                                        "main losses see noisy audio next to its clean version (beyond the paper)")
    local_loss: bool = _field(False, "under torchrun, L_cg over this rank's rows against all ranks' columns "
                              "(open_clip's --local-loss)")
    gather_with_grad: bool = _field(True, "under torchrun, gather L_cg's features with gradients (open_clip's "
                                    "--gather-with-grad; the gradient then equals the one-process gradient)")

    def validate(self) -> None:
        if self.matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {self.matching!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if not 0.0 <= self.noisy_fraction <= 1.0:
            raise ValueError(f"noisy_fraction must be in [0, 1], got {self.noisy_fraction}")
        if not 1 <= self.patch_stride <= 16:
            raise ValueError(f"patch_stride must be in [1, 16] (patches are 16x16), got {self.patch_stride}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.clip_seconds <= 0.2:
            raise ValueError(f"clip_seconds must be > 0.2, got {self.clip_seconds}")

    @classmethod
    def from_dict(cls, values: dict) -> "CoLLATConfig":
        return dataclass_from_dict(cls, values)


@dataclass
class TrainConfig:
    """The training run: schedule, precision, data, checkpoints and the final evaluation."""

    steps: int = _field(180, "optimizer steps")
    batch_size: int = _field(32, "global batch (split across ranks under torchrun)")
    lr: float = _field(5e-4, "peak learning rate (linear warmup, then cosine to 0)")
    weight_decay: float = _field(0.05, "AdamW weight decay (not on biases, norms, positions, the temperature)")
    warmup_steps: int = _field(20, "linear warmup steps")
    grad_clip: float = _field(1.0, "gradient norm clip")
    # augmentation and compilation
    augment: bool = _field(True, "training augmentation (the options below; never at evaluation or inference)")
    spec_time_mask: int = _field(80, "SpecAugment: widest time mask in fbank frames (AST: 192 of 1024); 0: none")
    spec_freq_mask: int = _field(24, "SpecAugment: widest frequency mask in mel bins (AST: 48 of 128); 0: none")
    gain_db: float = _field(6.0, "random gain of each clip, uniform in +-gain_db dB; 0: none")
    polarity: bool = _field(False, "flip the sign of each clip with probability 1/2 (off: the kaldi fbank of -x "
                            "is that of x, so it changes nothing before a fbank front end)")
    time_shift: float = _field(0.5, "roll each clip circularly by up to this many seconds; 0: none")
    mixup: float = _field(0.25, "probability that a clip is mixed with another clip of the batch (labels and "
                          "prompts combined, 'A and B'; only where the names fit max_mixup_names); 0: none")
    max_mixup_names: int = _field(3, "most class names a mixed clip's prompt may hold")
    noise_augment: float = _field(0.0, "fraction of clips that get Gaussian waveform noise before every loss sees "
                                  "them (robustness to noisy audio); 0: none")
    noise_augment_std: float = _field(0.1, "largest std of that noise (each clip draws its std uniformly from 0 "
                                      "up to it)")
    noise_augment_ramp: int = _field(0, "steps over which that largest std ramps up from 0 (a curriculum); 0: none")
    render_variety: bool = _field(True, "embedded data: vary the rendering of training clips (velocity, detune, "
                                  "vibrato, note lengths), each clip still a pure function of its index")
    compile: Literal["none", "default", "reduce-overhead"] = _field(
        "none", "torch.compile the audio encoder, interaction module and text tower (reduce-overhead: CUDA graphs)")
    fp8: bool = _field(False, "fp8 matmuls in the AST linear layers (torchao float8 training; CUDA only)")
    seed: int = _field(0, "seed of the model's initialisation, the batch order and the training noise")
    amp: Literal["auto", "bf16", "none"] = _field(
        "auto", "auto: bf16 autocast on CUDA and on CPUs with native bf16, fp32 elsewhere (emulated bf16 is "
        "~3x slower than fp32)")
    device: str = _field("auto", "auto | cpu | cuda | cuda:N")
    out: str = _field("runs/collat", "run folder: checkpoint/, log.jsonl, losses.png, results.json")
    resume: bool = _field(False, "continue from OUT/checkpoint (bit-exact on CPU)")
    save_every: int = _field(50, "checkpoint every this many steps (and at the end, and on Ctrl-C)")
    train_size: int = _field(8192, "clips in the embedded training split (rendered on the fly)")
    data_seed: int = _field(0, "seed of the embedded data sets")
    num_workers: int = _field(0, "DataLoader worker processes")
    train_manifest: Optional[str] = _field(None, "train on the audio files of this CSV/JSONL manifest (rows of "
                                           "--train-split; evaluate on the labelled rows of --eval-split)")
    train_shards: Optional[str] = _field(None, "train on WebDataset tar shards (a folder with sizes.json and "
                                         "classes.json, a brace pattern or a list file)")
    train_split: str = _field("train", "manifest split to train on")
    eval_split: str = _field("test", "manifest split to evaluate on")
    shuffle_buffer: int = _field(1000, "samples in the shard stream's shuffle buffer")
    eval_size: int = _field(200, "clips per evaluation set (the held-out single-source set: half)")
    eval_batch_size: int = _field(64, "clips per batch in the evaluations")
    eval_noise_std: float = _field(0.1, "std of the Gaussian noise of the 'noisy audio' evaluation")
    evaluate: bool = _field(True, "evaluate the untrained and the trained model at the end")
    stop_at_step: Optional[int] = _field(None, "stop (and checkpoint) after this step, as if interrupted")
    progress: bool = _field(True, "show a progress bar")

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, values)


def dataclass_from_dict(cls, values: dict):
    """cls(**values), refusing unknown keys with a message that lists the known ones."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__} values must be a mapping of field names, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(names)}")
    return cls(**values)


def preset_names() -> list[str]:
    return sorted(name[:-5] for name in os.listdir(PRESET_DIR) if name.endswith(".json"))


def read_config_file(path: str) -> dict:
    """{"model": {CoLLATConfig fields}, "train": {TrainConfig fields}} from a JSON file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            payload = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"config file {path} must hold an object with 'model' and 'train', got {type(payload).__name__}")
    unknown = set(payload) - {"model", "train"}
    if unknown:
        raise ValueError(f"config file {path}: top-level keys must be 'model' and 'train', got {sorted(unknown)}")
    return payload


def load_preset(name: str) -> tuple[CoLLATConfig, TrainConfig]:
    """The defaults with the preset collat/configs/NAME.json applied."""
    if name not in preset_names():
        raise ValueError(f"preset must be one of {preset_names()}, got {name!r}")
    payload = read_config_file(os.path.join(PRESET_DIR, f"{name}.json"))
    return CoLLATConfig.from_dict(payload.get("model", {})), TrainConfig.from_dict(payload.get("train", {}))
