"""The trainer state (optimizer, scheduler, RNG states, step, config) on disk without pickle: every tensor
and array goes to trainer_state.safetensors, everything else to trainer_state.json, so reading a
checkpoint can never run code that a crafted file put there.

The JSON is a tree of plain values in which a few tagged objects stand for what JSON lacks:
{"__tensor__": key} (a tensor in the safetensors file), {"__ndarray__": key, "dtype": ...} (a NumPy
array, e.g. NumPy's RNG key), {"__tuple__": [...]} and {"__items__": [[key, value], ...]} (a dict with
keys that are not strings, e.g. the optimizer's parameter indices). Floats go through repr, so every
value comes back bit-exact.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import torch

from collat.fileio import atomic_write, atomic_write_text

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # written by collat before the safetensors + JSON format (a pickle)
FORMAT = "collat-trainer-state"
FORMAT_VERSION = 1
TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class TrainerStateError(ValueError):
    """A trainer state that is missing, incomplete, corrupt or in a format that is not read."""


def _flatten(value, tensors: dict, memo: dict):
    if isinstance(value, torch.Tensor):
        if id(value) not in memo:  # the same tensor twice is stored once (safetensors refuses shared memory)
            memo[id(value)] = str(len(tensors))
            tensors[memo[id(value)]] = value.detach().to("cpu").contiguous()
        return {"__tensor__": memo[id(value)]}
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot store a NumPy array of dtype {value.dtype} in a trainer state")
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value).copy())
        return {"__ndarray__": key, "dtype": value.dtype.str}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, tensors, memo) for v in value]}
    if isinstance(value, list):
        return [_flatten(v, tensors, memo) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _flatten(v, tensors, memo) for k, v in value.items()}
        return {"__items__": [[_flatten(k, tensors, memo), _flatten(v, tensors, memo)] for k, v in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in a trainer state")


def _unflatten(node, tensors: dict, where: str):
    if isinstance(node, list):
        return [_unflatten(v, tensors, where) for v in node]
    if not isinstance(node, dict):
        return node
    tags = [key for key in node if key in TAGS]
    if not tags:
        if any(key.startswith("__") for key in node):
            raise TrainerStateError(f"{where}: unknown tag in {sorted(node)}")
        return {k: _unflatten(v, tensors, where) for k, v in node.items()}
    tag = tags[0]
    if tag in ("__tensor__", "__ndarray__"):
        key = node[tag]
        if key not in tensors:
            raise TrainerStateError(f"{where}: tensor {key!r} is missing from {STATE_TENSORS}")
        if tag == "__tensor__":
            return tensors[key]
        return tensors[key].numpy().astype(np.dtype(node["dtype"]))
    if tag == "__tuple__":
        return tuple(_unflatten(v, tensors, where) for v in node[tag])
    return {_unflatten(k, tensors, where): _unflatten(v, tensors, where) for k, v in node[tag]}


def write_trainer_state(directory: str, state: dict) -> None:
    """The tensors first, the JSON last: a folder whose JSON is there has both files whole."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors, {})
    atomic_write(os.path.join(directory, STATE_TENSORS), lambda path: save_file(tensors, path))
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "state": tree}
    atomic_write_text(os.path.join(directory, STATE_JSON), json.dumps(payload))


def read_state_step(directory: str) -> int | None:
    """The step recorded in a folder's trainer state, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(directory, STATE_JSON), encoding="utf-8") as handle:
            step = json.load(handle)["state"]["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_trainer_state(directory: str) -> dict:
    """The state written by write_trainer_state (or, read safely, by an older collat's trainer_state.pt)."""
    json_path = os.path.join(directory, STATE_JSON)
    if not os.path.isfile(json_path) and os.path.isfile(os.path.join(directory, LEGACY_STATE)):
        return read_legacy_state(os.path.join(directory, LEGACY_STATE))
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        with open(json_path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except FileNotFoundError:
        raise TrainerStateError(f"{directory} has no {STATE_JSON}; is it a complete training checkpoint?") from None
    except (OSError, ValueError) as error:
        raise TrainerStateError(f"{json_path} is not a readable JSON trainer state: {error}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("state"), dict):
        raise TrainerStateError(f"{json_path} is not a collat trainer state (no format {FORMAT!r})")
    if payload.get("format_version") != FORMAT_VERSION:
        raise TrainerStateError(f"{json_path} has trainer-state format version {payload.get('format_version')}; "
                                f"this collat reads version {FORMAT_VERSION}")
    tensors_path = os.path.join(directory, STATE_TENSORS)
    try:
        tensors = load_file(tensors_path)
    except FileNotFoundError:
        raise TrainerStateError(f"{directory} has no {STATE_TENSORS}; the checkpoint is incomplete") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise TrainerStateError(f"{tensors_path} is not a readable safetensors file: {error}") from None
    return _unflatten(payload["state"], tensors, json_path)


def read_legacy_state(path: str) -> dict:
    """An older collat's pickled trainer_state.pt, read with torch.load(weights_only=True): tensors,
    plain containers and NumPy arrays (the RNG key) only; anything else is refused, never run."""
    numpy_globals = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np.dtypes.Float64DType, np.dtypes.Int64DType]
    reconstruct = getattr(np, "_core", np.core).multiarray._reconstruct
    try:
        with torch.serialization.safe_globals([reconstruct, *numpy_globals]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError, TypeError) as error:
        raise TrainerStateError(
            f"{path} (an older collat's pickled trainer state) cannot be read safely: {error}. This collat never "
            "unpickles arbitrary objects from a checkpoint; start a new run, or resume it with the collat that "
            "wrote it") from None
    if not isinstance(state, dict) or "step" not in state:
        raise TrainerStateError(f"{path} is not a collat trainer state")
    return state
