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
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from collat.ops import MATCHINGS, METRICS, Matching, Metric

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974
WINDOW_TYPES = ("hamming", "hanning", "povey", "rectangular", "blackman")
MAX_CLIP_SECONDS = 60.0  # AST tokens grow with the clip; longer audio is averaged over windows at inference
MAX_TARGET_FRAMES = 6000  # 60 s of fbank frames
CONFIG_EXTENSIONS = (".json", ".yaml", ".yml")


class ConfigError(ValueError):
    """A config value of the wrong type or out of range; `field` names it, so a caller can say
    where the value came from (a flag, a config file)."""

    def __init__(self, name: str, detail: str):
        self.field, self.detail = name, detail
        super().__init__(f"{name} {detail}")


def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _matches(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is typing.Union:
        return any(_matches(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a fine float (JSON writes 1e-3 as a float but 1.0 may come back as 1)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is typing.Union:
        return " or ".join(_type_name(arm) for arm in typing.get_args(hint))
    return "null" if hint is type(None) else {int: "an int", float: "a number", bool: "true or false",
                                               str: "a string"}.get(hint, str(hint))


def check_field_types(config) -> None:
    """Every field of a config dataclass holds a value of its annotated type (config files and
    Python callers bypass argparse's conversions). Literal choices are left to each validate(),
    which words them for the field."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        if typing.get_origin(hint) is Literal:
            continue
        if not _matches(value, hint):
            raise ConfigError(f.name, f"must be {_type_name(hints[f.name])}, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, f"must be a finite number, got {value}")


def _choices(config, name: str) -> tuple:
    """The values a Literal field allows (the annotation is the one definition)."""
    return typing.get_args(typing.get_type_hints(type(config))[name])


def _require(condition: bool, name: str, rule: str, value) -> None:
    if not condition:
        raise ConfigError(name, f"must be {rule}, got {value!r}")


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
        """Types and ranges of every field, checked before anything is built from them."""
        check_field_types(self)
        if self.matching not in MATCHINGS:
            raise ConfigError("matching", f"must be one of {MATCHINGS}, got {self.matching!r}")
        if self.metric not in METRICS:
            raise ConfigError("metric", f"must be one of {METRICS}, got {self.metric!r}")
        sizes = _choices(self, "audio_size")
        _require(self.audio_size in sizes, "audio_size", f"one of {sizes} (the AST audio size)", self.audio_size)
        _require(self.window_type in WINDOW_TYPES, "window_type", f"one of {WINDOW_TYPES}", self.window_type)
        _require(0.0 <= self.noisy_fraction <= 1.0, "noisy_fraction", "in [0, 1]", self.noisy_fraction)
        _require(1 <= self.patch_stride <= 16, "patch_stride", "in [1, 16] (patches are 16x16)", self.patch_stride)
        _require(self.noise_std >= 0, "noise_std", ">= 0", self.noise_std)
        _require(0.2 < self.clip_seconds <= MAX_CLIP_SECONDS, "clip_seconds", f"> 0.2 and <= {MAX_CLIP_SECONDS:g} "
                 "(longer audio is averaged over windows at inference)", self.clip_seconds)
        if self.target_frames is not None:
            _require(16 <= self.target_frames <= MAX_TARGET_FRAMES, "target_frames",
                     f"in [16, {MAX_TARGET_FRAMES}] or null", self.target_frames)
        if self.context_length is not None:
            _require(2 <= self.context_length <= 512, "context_length", "in [2, 512] or null", self.context_length)
        _require(bool(self.text_encoder.strip()), "text_encoder", "a non-empty name", self.text_encoder)
        _require(self.interaction_depth >= 1, "interaction_depth", ">= 1", self.interaction_depth)
        _require(self.interaction_heads >= 1, "interaction_heads", ">= 1", self.interaction_heads)
        _require(self.interaction_mlp_ratio > 0, "interaction_mlp_ratio", "> 0", self.interaction_mlp_ratio)
        _require(self.fbank_std > 0, "fbank_std", "> 0", self.fbank_std)
        for name in ("lambda_ct", "lambda_cg", "lambda_ut"):
            _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))

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
    # wt-train: host syncs, logging integrations, evaluation during training and on shard runs
    log_every: int = _field(1, "read the losses and write log.jsonl every this many steps: one host sync per "
                            "read (raise it on a GPU so steps queue without waiting; a non-finite loss still "
                            "skips its own update at once and stops the run at the next read)")
    report_to: Literal["none", "tensorboard"] = _field("none", "also log the losses and evaluations to "
                                                       "TensorBoard event files in OUT/tensorboard (offline)")
    eval_every: int = _field(0, "run the zero-shot evaluation every this many steps during training and log it "
                             "(log.jsonl, TensorBoard); 0: only before and after training")
    eval_manifest: Optional[str] = _field(None, "evaluate on the labelled --eval-split rows of this manifest "
                                          "(default: the training manifest's; shard training evaluates only "
                                          "with it)")

    def validate(self) -> None:
        """Types and ranges of every field (config files and Python callers bypass argparse)."""
        check_field_types(self)
        for name in ("steps", "batch_size", "save_every", "train_size", "eval_size", "eval_batch_size", "log_every"):
            _require(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        for name in ("warmup_steps", "num_workers", "shuffle_buffer", "eval_every"):
            _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        for name in ("lr", "weight_decay", "eval_noise_std"):
            _require(getattr(self, name) >= 0, name, ">= 0", getattr(self, name))
        _require(self.grad_clip > 0, "grad_clip", "> 0", self.grad_clip)
        for name in ("amp", "report_to"):
            _require(getattr(self, name) in _choices(self, name), name, f"one of {_choices(self, name)}",
                     getattr(self, name))
        if self.stop_at_step is not None:
            _require(self.stop_at_step >= 1, "stop_at_step", ">= 1 or null", self.stop_at_step)
        _require(bool(self.out.strip()), "out", "a folder name", self.out)
        _require(bool(self.device.strip()), "device", "auto, cpu, cuda or cuda:N", self.device)

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
    """{"model": {CoLLATConfig fields}, "train": {TrainConfig fields}} from a JSON or YAML file (by
    extension; YAML through yaml.safe_load, which builds plain values only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in CONFIG_EXTENSIONS:
        raise ValueError(f"config file {path} must end in one of {CONFIG_EXTENSIONS}")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # -sig: files saved by Windows editors start with a BOM
            text = handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} cannot be read as UTF-8 text: {error}") from None
    if extension == ".json":
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    else:
        import yaml

        try:
            payload = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path} is not valid YAML: {error}") from None
        payload = {} if payload is None else payload
    if not isinstance(payload, dict):
        raise ValueError(f"config file {path} must hold an object with 'model' and 'train', got {type(payload).__name__}")
    unknown = set(payload) - {"model", "train"}
    if unknown:
        raise ValueError(f"config file {path}: top-level keys must be 'model' and 'train', got {sorted(unknown)}")
    for section in ("model", "train"):
        if not isinstance(payload.get(section, {}), dict):
            raise ValueError(f"config file {path}: '{section}' must be an object of field values, got "
                             f"{_describe(payload[section])}")
    return payload


def load_preset(name: str) -> tuple[CoLLATConfig, TrainConfig]:
    """The defaults with the preset collat/configs/NAME.json applied."""
    if name not in preset_names():
        raise ValueError(f"preset must be one of {preset_names()}, got {name!r}")
    payload = read_config_file(os.path.join(PRESET_DIR, f"{name}.json"))
    return CoLLATConfig.from_dict(payload.get("model", {})), TrainConfig.from_dict(payload.get("train", {}))
