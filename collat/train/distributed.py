"""Several processes under torchrun: the process group, per-rank seeds and reductions of logged values."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from collat.device import resolve_device


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    owns_group: bool = False  # run() created the process group and destroys it when it ends

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[World, torch.device]:
    """Join torchrun's process group (WORLD_SIZE > 1; rendezvous through its env:// variables, so
    multi-node works as torchrun sets it up): nccl when training on CUDA, gloo on CPU."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_arg != "auto":
        resolve_device(device_arg)  # a clear ValueError for a device that is malformed or not on this machine
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns_group = False
    if use_cuda:  # before init: nccl binds each rank to its own device
        device = torch.device("cuda", local_rank) if device_arg in ("auto", "cuda") else torch.device(device_arg)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if size > 1 or (dist.is_available() and dist.is_initialized()):
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            owns_group = True
        world = World(dist.get_rank(), local_rank, dist.get_world_size(), owns_group)
    else:
        world = World()
    return world, device


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A per-rank seed for the training RNG streams (noisy twins of L_ut, resampled queries), so the
    ranks do not all draw the same noise; (seed, rank, step) -> a distinct 63-bit seed."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def reduce_mean(values: list[float], device: torch.device, world: World) -> list[float]:
    """The mean over the ranks of each value (the values themselves in one process)."""
    if world.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world.size).tolist()
