"""Training checkpoints: RUN/checkpoint/ holds the model (config.json + model.safetensors) and
trainer_state.pt (optimizer, scheduler, step, every RNG state), replaced as a whole so that a crash at
any moment leaves one complete checkpoint."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist

from collat.config import TrainConfig
from collat.fileio import atomic_write
from collat.model.pretrained import RUN_CHECKPOINT_DIR, WEIGHTS_NAME
from collat.train.distributed import World, rank_seed, seed_everything

CHECKPOINT_DIR = RUN_CHECKPOINT_DIR
TRAINER_STATE = "trainer_state.pt"


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


def save_checkpoint(out: str, model, optimizer, scheduler, step: int, train_config: TrainConfig,
                    rng_per_rank: list | None = None) -> str:
    """Write DIR/checkpoint.tmp completely, then swap it in place of DIR/checkpoint (the old one is kept
    as checkpoint.old until the swap is done, so a crash at any point leaves one whole checkpoint).

    Nothing in it depends on the number of ranks (the weights are the bare model's, not DDP's), so it
    resumes under any world size; `rng_per_rank` (every rank's RNG states, under torchrun) lets a
    resume with the same world size continue each rank's random stream."""
    final = os.path.join(out, CHECKPOINT_DIR)
    tmp, old = final + ".tmp", final + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rng_state(), "train_config": dataclasses.asdict(train_config)}
    if rng_per_rank is not None:
        state["rng_per_rank"] = rng_per_rank
    atomic_write(os.path.join(tmp, TRAINER_STATE), lambda path: torch.save(state, path))
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: str) -> str | None:
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = os.path.join(out, name)
        if os.path.isfile(os.path.join(path, TRAINER_STATE)):
            return path
    return None


def load_checkpoint(path: str, model, optimizer, scheduler, world: World | None = None,
                    seed: int = 0) -> int:
    """Load weights, optimizer, scheduler and RNG states; returns the step to continue from.

    RNG: one process restores the saved (rank-0) state, bit-exact. K processes restore their own
    rank's state when the checkpoint was written by K processes, else (another world size) they
    reseed per rank from (seed, rank, step): the data order still follows the step, the noise does not."""
    from safetensors.torch import load_file

    saved_config = model.read_config(path)
    if dataclasses.asdict(saved_config) | {"fused": None} != dataclasses.asdict(model.config) | {"fused": None}:
        raise ValueError(f"checkpoint {path} was written with another model config; resume with the same options")
    model.load_weights(load_file(os.path.join(path, WEIGHTS_NAME), device=str(model.device)))
    state = torch.load(os.path.join(path, TRAINER_STATE), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    world = world or World()
    per_rank = state.get("rng_per_rank")
    if world.size == 1:
        set_rng_state(state["rng"])
    elif per_rank is not None and len(per_rank) == world.size:
        set_rng_state(per_rank[world.rank])
    else:
        seed_everything(rank_seed(seed, world.rank, step))
    return step


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


