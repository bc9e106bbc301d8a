"""Saving and loading a CoLLAT, hub style (huggingface_hub's PyTorchModelHubMixin: `save_pretrained`,
`from_pretrained`, `push_to_hub`, a generated model card). A checkpoint is a self-contained folder:

    config.json        format version, the CoLLATConfig, and the architecture of each encoder (the CLIP text
                       tower's open_clip config or MiniLM's BERT config; the AST's transformers config)
    model.safetensors  every weight
    tokenizer/         the text encoder's tokenizer files, where it has any (MiniLM; CLIP's ships with open_clip)
    README.md          the model card (architecture, training data, results)

`from_pretrained` builds each part from config.json with random weights and loads every weight from
model.safetensors: it never opens the files the model was first built from. `text_checkpoint` /
`audio_checkpoint` stay in the config only as a record of where the weights came from.

Format version 1 (no recorded architecture) still loads: its encoders are rebuilt as they were then (the
packaged MiniLM or the named MiniLM folder, a CLIP by open_clip name, the named AST folder or the size
preset); saving it again writes version 2. `checkpoint_folder` also accepts a training run folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin

from collat.config import CoLLATConfig
from collat.fileio import atomic_write, atomic_write_text
from collat.model import card as card_lib

ARCHITECTURE = "CoLLAT"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RUN_CHECKPOINT_DIR = "checkpoint"  # where a training run folder keeps its latest checkpoint
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class PretrainedMixin(
    PyTorchModelHubMixin,
    library_name="collat",
    tags=["audio", "zero-shot-audio-classification", "collat", "clap"],
    pipeline_tag="zero-shot-audio-classification",
    model_card_template=card_lib.TEMPLATE,
):
    """Hub-style saving and loading for CoLLAT (a module with `config`, `text` and `audio`)."""

    config: CoLLATConfig
    _keep_in_fp32_modules: tuple[str, ...] = ()  # children that `dtype=` leaves in float32

    # ------------------------------------------------------------------------------------ saving
    def config_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION,
                "config": dataclasses.asdict(self.config),
                "text": self.text.architecture(), "audio": self.audio.architecture()}

    def save_pretrained(self, save_directory, *, card: dict | None = None, **hub_kwargs):
        """Write the checkpoint folder (see the module docstring); each file is replaced atomically.

        card: what the model card (README.md) records beyond the config: {"training_data": str,
        "results": {column: {metric: value}} or {metric: value}, "notes": str}, all optional.
        Other keyword arguments go to huggingface_hub (push_to_hub=True, repo_id=...)."""
        card = card_lib.check_card(card if card is not None else hub_kwargs.pop("model_card_kwargs", None))
        directory = Path(save_directory)
        # The mixin keeps an existing README.md; the card must describe these weights, so it goes first.
        (directory / card_lib.CARD_NAME).unlink(missing_ok=True)
        hub_kwargs.pop("config", None)  # config.json is ours (architecture + CoLLATConfig), never the mixin's
        return super().save_pretrained(directory, model_card_kwargs=card, **hub_kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(save_directory / WEIGHTS_NAME, lambda path: save_file(state, path, metadata={"format": "pt"}))
        self.text.save_files(str(save_directory))
        atomic_write_text(save_directory / CONFIG_NAME, json.dumps(self.config_dict(), indent=2))

    def generate_model_card(self, *args, **card) -> ModelCard:
        return ModelCard.from_template(card_data=self._hub_mixin_info.model_card_data,
                                       template_str=self._hub_mixin_info.model_card_template,
                                       **card_lib.card_values(self, FORMAT_VERSION, **card))

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def read_config(cls, directory: str) -> CoLLATConfig:
        """The CoLLATConfig a checkpoint folder was saved with (clear errors naming the file)."""
        return config_from_payload(read_checkpoint_config(directory), directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, device=None, dtype=None, map_location=None,
                        force_download: bool = False, token=None, cache_dir=None, local_files_only: bool = False,
                        revision: str | None = None):
        """A CoLLAT in eval mode from a checkpoint folder, a training run folder or a Hugging Face Hub repo id.

        device: where the model goes (`map_location` is the older name); dtype: torch.float16 / torch.bfloat16
        (or "fp16" / "bf16") casts every weight except the fbank front end's, for half-precision inference.
        Building never moves the caller's random number generator."""
        directory = resolve_checkpoint(pretrained_model_name_or_path, force_download=force_download, token=token,
                                       cache_dir=cache_dir, local_files_only=local_files_only, revision=revision)
        payload = read_checkpoint_config(directory)
        config = config_from_payload(payload, directory)
        state = load_weights_file(os.path.join(directory, WEIGHTS_NAME))  # a damaged file fails before building
        with torch.random.fork_rng(devices=[]):
            model = _build(cls, config, payload, directory)
        model.load_weights(state)
        model.eval()
        return model.place(device if device is not None else map_location, dtype)

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

    def place(self, device=None, dtype=None):
        """Move to `device`; cast every floating-point weight but `_keep_in_fp32_modules`' to `dtype`."""
        if device is not None:
            self.to(torch.device(device) if isinstance(device, str) else device)
        if dtype is not None:
            dtype = resolve_dtype(dtype)
            for name, child in self.named_children():
                if name not in self._keep_in_fp32_modules:
                    child.to(dtype)
            for param in self.parameters(recurse=False):
                param.data = param.data.to(dtype)
        return self


def _build(cls, config: CoLLATConfig, payload: dict, directory: str):
    if payload["format_version"] >= 2:
        return cls(config, architecture={"text": {**payload["text"], "root": directory}, "audio": payload["audio"]})
    # Version 1: rebuild as before. A CLIP tower's architecture is open_clip's by name, so its file is not needed.
    build_config = config
    if config.text_encoder.startswith("clip:"):
        build_config = dataclasses.replace(config, text_checkpoint=None)
    for name in ("text_checkpoint", "audio_checkpoint"):
        path = getattr(build_config, name)
        if path is not None and not os.path.exists(path):
            raise FileNotFoundError(
                f"{directory} is a format-version-1 checkpoint, which does not record its encoders' architecture: "
                f"loading it needs its {name} {path}, which is not there. Load it where that path exists and save it "
                "again (save_pretrained writes a self-contained version 2).")
    model = cls(build_config)
    model.config = model._hub_mixin_config = config
    return model


def read_checkpoint_config(directory: str) -> dict:
    """config.json of a checkpoint folder, checked: a JSON object of a readable CoLLAT format version."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"checkpoint directory not found: {directory}")
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a CoLLAT checkpoint?")
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} must hold a JSON object with 'architecture', 'format_version' and 'config', "
                         f"got a JSON {type(payload).__name__}")
    arch = payload.get("architecture")
    if arch != ARCHITECTURE:
        raise ValueError(f"{directory} holds a {arch!r} checkpoint, not {ARCHITECTURE!r} ({path})")
    version = payload.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{directory} has checkpoint format version {version}, this collat reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))} ({path})")
    required = ("config", "text", "audio") if version >= 2 else ("config",)
    for key in required:
        if not isinstance(payload.get(key), dict):
            raise ValueError(f"{path} has no {key!r} object, which format version {version} requires")
    return payload


def config_from_payload(payload: dict, directory: str) -> CoLLATConfig:
    try:
        return CoLLATConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)}: {error}") from None


def load_weights_file(path: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a model.safetensors; a damaged or truncated file is a ValueError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{os.path.dirname(path) or '.'} has no {os.path.basename(path)}")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is damaged or incomplete: it is not a readable safetensors file ({error})") from None


def resolve_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (or one of {sorted(DTYPES)}), "
                     f"got {dtype!r}")


def resolve_checkpoint(name_or_path, **hub_kwargs) -> str:
    """A local checkpoint folder (a training run folder gives its checkpoint/), else a Hub repo id's snapshot."""
    name = os.fspath(name_or_path)
    if os.path.exists(name) or not _REPO_ID.match(name):
        return checkpoint_folder(name)
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=name, **hub_kwargs)
    except Exception as error:  # offline, unknown repo, no access: all mean "not found" to the caller
        raise FileNotFoundError(f"model checkpoint not found: {name} is not a local folder, and the Hugging Face "
                                f"Hub did not provide it ({type(error).__name__}: {error})") from None


def checkpoint_folder(directory: str | os.PathLike) -> str:
    """The checkpoint folder a path names: itself, or RUN/checkpoint/ for a training run folder."""
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"model checkpoint not found: {directory}")
    if not os.path.isdir(directory):
        raise ValueError(f"a model must be a checkpoint folder (config.json + model.safetensors), got the file {directory}")
    nested = os.path.join(directory, RUN_CHECKPOINT_DIR)
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        return nested
    return directory
