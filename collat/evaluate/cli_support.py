"""What the command lines (collat.evaluate, collat.predict) share: loading a model so that every way a
checkpoint folder can be broken is one clear error naming the file at fault (not a traceback from deep
inside json, safetensors or the model), argument types that refuse nonsense numbers with the flag's
name, and writing an output file after the results are printed."""
from __future__ import annotations

import argparse
import math
import os

import torch

from collat.config import ConfigError
from collat.model import load_model
from collat.model.pretrained import CONFIG_NAME, checkpoint_folder


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file."""


def load_model_checked(path: str | os.PathLike, device: torch.device):
    """collat.model.load_model, with FileNotFoundError / CheckpointError naming the file when it fails."""
    folder = checkpoint_folder(path)
    config_path = os.path.join(folder, CONFIG_NAME)
    try:
        return load_model(folder, device)
    except (FileNotFoundError, CheckpointError):
        raise
    except ConfigError as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    except (KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(f"{config_path} is not a CoLLAT config ({type(error).__name__}: {error})") from None
    except ValueError as error:
        message = str(error)
        raise CheckpointError(message if folder in message else f"{folder}: {message}") from None
    except Exception as error:  # noqa: BLE001 -- anything else the encoders' loaders raise, named
        raise CheckpointError(f"cannot load the model in {folder}: {type(error).__name__}: {error}") from None


def _number(kind, minimum, inclusive: bool = True):
    """An argparse type: a finite `kind` >= minimum (> minimum when not inclusive)."""
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
non_negative_float = _number(float, 0.0)
positive_float = _number(float, 0.0, inclusive=False)
