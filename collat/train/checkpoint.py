"""Training checkpoints: RUN/checkpoint/ holds the model (config.json + model.safetensors) and the trainer
state (optimizer, scheduler, step, every RNG state; safetensors + JSON, see state_io.py, so reading one
never unpickles anything), replaced as a whole so that a crash at any moment leaves a complete one.

A save writes RUN/checkpoint.tmp, moves the current RUN/checkpoint aside to checkpoint.old, renames the
new one into place and removes the old one. A crash can stop that at any point, and again in the next
save; `find_checkpoint` takes the newest complete one of the three folders wherever it is, and the
next save first puts it back in place: no save deletes the newest complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

from collat.config import TrainConfig
from collat.model.pretrained import (
    CONFIG_NAME,
    RUN_CHECKPOINT_DIR,
    WEIGHTS_NAME,
    load_weights_file,
)
from collat.train.distributed import World, rank_seed, seed_everything
from collat.train.optim import apply_schedule
from collat.train.state_io import (
    LEGACY_STATE,
    STATE_JSON,
    STATE_TENSORS,
    TrainerStateError,
    read_state_step,
    read_trainer_state,
    write_trainer_state,
)

CHECKPOINT_DIR = RUN_CHECKPOINT_DIR
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, STATE_TENSORS, STATE_JSON)
# Changing these on --resume would change the batches from the resumed step on: refused.
RESUME_MUST_MATCH = ("batch_size", "seed", "data_seed", "train_size", "train_manifest", "train_shards", "train_split",
                     "shuffle_buffer")
# These take effect from the resumed step on (the learning-rate schedule is recomputed); each is logged.
RESUME_APPLIED = ("lr", "weight_decay", "warmup_steps", "steps", "grad_clip", "amp")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ where it is
def checkpoint_folders(out: str) -> dict[str, str]:
    final = os.path.join(out, CHECKPOINT_DIR)
    return {"final": final, "tmp": final + ".tmp", "old": final + ".old"}


def checkpoint_step(path: str) -> int | None:
    """The step of a complete checkpoint folder; None when a file is missing or the step unreadable.
    An older collat's folder (pickled trainer_state.pt) counts with step -1: loading it says why it is refused."""
    if not all(os.path.isfile(os.path.join(path, name)) for name in (CONFIG_NAME, WEIGHTS_NAME)):
        return None
    if os.path.isfile(os.path.join(path, STATE_TENSORS)):
        return read_state_step(path)
    return -1 if os.path.isfile(os.path.join(path, LEGACY_STATE)) else None


def find_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint of a run folder, wherever a crash during a save left it
    (checkpoint, checkpoint.tmp or checkpoint.old); on equal steps checkpoint/ wins, then .tmp."""
    found = [(step, -rank, path) for rank, path in enumerate(checkpoint_folders(out).values())
             if (step := checkpoint_step(path)) is not None]
    return max(found)[2] if found else None


# ------------------------------------------------------------------------------------------ saving
def _remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _put_back(folders: dict[str, str]) -> None:
    """Undo what a crashed save left: a complete checkpoint.tmp newer than checkpoint/ becomes
    checkpoint/ (the one it replaces moves to .old); any other .tmp is removed."""
    tmp_step = checkpoint_step(folders["tmp"])
    final_step = checkpoint_step(folders["final"])
    if tmp_step is not None and (final_step is None or tmp_step > final_step):
        if os.path.isdir(folders["final"]):
            _remove(folders["old"])
            os.replace(folders["final"], folders["old"])
        os.replace(folders["tmp"], folders["final"])
    else:
        _remove(folders["tmp"])


def save_checkpoint(out: str, model, optimizer, scheduler, step: int, train_config: TrainConfig,
                    rng_per_rank: list | None = None) -> str:
    """Write DIR/checkpoint.tmp completely, then swap it in place of DIR/checkpoint (the old one is kept
    as checkpoint.old until the swap is done; see the module docstring for crashes).

    Nothing in it depends on the number of ranks (the weights are the bare model's, not DDP's), so it
    resumes under any world size; `rng_per_rank` (every rank's RNG states, under torchrun) lets a
    resume with the same world size continue each rank's random stream."""
    folders = checkpoint_folders(out)
    _put_back(folders)
    model.save_pretrained(folders["tmp"])
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "train_config": dataclasses.asdict(train_config)}
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    write_trainer_state(folders["tmp"], state)
    if os.path.isdir(folders["final"]):
        _remove(folders["old"])
        os.replace(folders["final"], folders["old"])
    os.replace(folders["tmp"], folders["final"])
    _remove(folders["old"])
    return folders["final"]


def save_on_main(out: str, model, optimizer, scheduler, step: int, train_config: TrainConfig,
                 world: World) -> None:
    """Rank 0 writes the checkpoint (with every rank's RNG states); the others wait until it is whole."""
    rng_per_rank = None
    if world.size > 1:
        rng_per_rank = [None] * world.size
        dist.all_gather_object(rng_per_rank, rng_state())
    if world.is_main:
        save_checkpoint(out, model, optimizer, scheduler, step, train_config, rng_per_rank)
    if world.size > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------ resuming
def resume_changes(saved: dict, current: TrainConfig, path: str) -> list[str]:
    """Refuse options whose change would alter the batches after a resume; list the applied changes."""
    def changed(names):
        return [(name, saved[name], getattr(current, name)) for name in names
                if name in saved and saved[name] != getattr(current, name)]

    irrelevant = {"train_size"} if current.train_manifest or current.train_shards else set()  # embedded data only
    irrelevant |= set() if current.train_shards else {"shuffle_buffer"}  # shard streams only
    refused = changed([name for name in RESUME_MUST_MATCH if name not in irrelevant])
    if refused:
        listed = ", ".join(f"--{name.replace('_', '-')} {old!r} -> {new!r}" for name, old, new in refused)
        raise ValueError(f"cannot resume {path}: {listed} changed since the checkpoint was written, and the batch "
                         "order depends on it. Resume with the saved values, or start a new run in another --out")
    return [f"{name} {old!r} -> {new!r}" for name, old, new in changed(RESUME_APPLIED)]


def load_checkpoint(path: str, model, optimizer, scheduler, world: World | None = None,
                    train_config: TrainConfig | None = None) -> int:
    """Load weights, optimizer, scheduler and RNG states; returns the step to continue from.

    `train_config` is this run's: options that would change the batches must equal the saved ones;
    a changed lr, weight decay, warmup or step count applies from the resumed step on (and is logged).
    RNG: one process restores the saved (rank-0) state, bit-exact. K processes restore their own
    rank's state when the checkpoint was written by K processes, else (another world size) they
    reseed per rank from (seed, rank, step): the data order still follows the step, the noise does not."""
    world = world or World()
    train_config = train_config or TrainConfig()
    config_path = os.path.join(path, CONFIG_NAME)
    try:
        saved_config = model.read_config(path)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # corrupt JSON, not a CoLLAT config
        message = str(error)
        raise TrainerStateError(message if path in message else f"{config_path}: {type(error).__name__}: {message}") \
            from None
    if dataclasses.asdict(saved_config) | {"fused": None} != dataclasses.asdict(model.config) | {"fused": None}:
        raise ValueError(f"checkpoint {path} was written with another model config; resume with the same options")
    state = read_trainer_state(path)
    applied = resume_changes(state.get("train_config", {}), train_config, path)
    weights_path = os.path.join(path, WEIGHTS_NAME)
    try:
        weights = load_weights_file(weights_path, device=model.device)
    except ValueError as error:  # damaged or incomplete; the message names the file
        raise TrainerStateError(str(error)) from None
    model.load_weights(weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    if applied:
        apply_schedule(optimizer, scheduler, train_config)
        if world.is_main:
            print(f"--resume: {', '.join(applied)}; applied from step {step} on", file=sys.stderr)
    per_rank = state.get("rng_per_rank")
    if world.size == 1:
        set_rng_state(state["rng"])
    elif per_rank is not None and len(per_rank) == world.size:
        set_rng_state(per_rank[world.rank])
    else:
        seed_everything(rank_seed(train_config.seed, world.rank, step))
    return step
