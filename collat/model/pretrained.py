"""Saving and loading a CoLLAT: a folder with config.json (architecture, format version, config) and
model.safetensors (every weight), each file replaced atomically. `checkpoint_folder` also accepts a
training run folder, whose weights live in RUN/checkpoint/.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch

from collat.config import CoLLATConfig
from collat.fileio import atomic_write, atomic_write_text

ARCHITECTURE = "CoLLAT"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
RUN_CHECKPOINT_DIR = "checkpoint"  # where a training run folder keeps its latest checkpoint


class PretrainedMixin:
    """save_pretrained / from_pretrained for a module built from a CoLLATConfig (`self.config`)."""

    config: CoLLATConfig

    def config_dict(self) -> dict:
        return {"architecture": ARCHITECTURE, "format_version": FORMAT_VERSION, "config": dataclasses.asdict(self.config)}

    def save_pretrained(self, directory: str) -> None:
        """config.json + model.safetensors, each written to a temporary file, then renamed into place."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda path: save_file(state, path, metadata={"format": "pt"}))
        atomic_write_text(os.path.join(directory, CONFIG_NAME), json.dumps(self.config_dict(), indent=2))

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
    def from_pretrained(cls, directory: str, map_location=None):
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
