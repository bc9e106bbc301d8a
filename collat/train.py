"""`python -m collat.train`: train CoLLAT on the embedded soundfont data, then evaluate.

With no arguments it runs the CPU-sized default (DESIGN.md section 5): 4 s clips of 30 seen GM
classes, tiny AST (d=192, 4 layers), the locked all-MiniLM-L6-v2, 4 interaction blocks + head,
batch 32, 180 steps -- about 10 minutes on 2 cores (measured on an AVX2 EPYC without native bf16, so
in fp32: ~2.7 s/step, 200 steps + both evaluations in 12.9 min while another process shared the CPU).
At the end it prints
zero-shot top-1 on single-source clips of seen and held-out classes, macro mAP on 2-3-source
mixtures, and the same on noisy audio, each beside the untrained model's figure.

CPU default deviations from the paper, and why:
  * patch_stride = 16 (paper and AST: 10): non-overlapping patches give 8 x 25 = 200 audio tokens for
    a 4 s clip instead of 12 x 39 = 468, which halves the step time on a CPU.
  * lambda_cg = 1.0 (paper 0.1): with 0.1 the global loss sat at ln(batch) -- every clip mapped to one
    class -- for ~220 of the ~330 affordable steps (DESIGN.md section 5); with 1.0 learning starts at once.
  * noisy_fraction = 0.25 (paper 1.0): a quarter of the batch gets a noisy twin for L_ut, which keeps
    the extra AST work at +25% instead of +100%. `--preset paper` restores the paper's settings.

`--preset paper` is the real size for a GPU: AST-base, CLIP ViT-B-32 text tower (random weights unless
--text-checkpoint names a local open_clip checkpoint), 8 blocks, 10 s clips, lambda = (1, 0.1, 0.01).

Checkpoints (DIR/checkpoint/: model.safetensors + config.json + trainer_state.pt with optimizer,
scheduler, step and every RNG state) are replaced atomically; SIGINT/SIGTERM saves one and stops;
`--resume` continues bit-exactly on CPU. Every step is appended to DIR/log.jsonl; DIR/losses.png plots
the curves; DIR/results.json holds the final table.

Several processes: `torchrun --nproc_per_node=K -m collat.train ...` (several machines: add torchrun's
--nnodes/--node-rank/--rdzv-endpoint; resuming needs DIR on a shared file system). Each rank runs a
DistributedDataParallel replica (gloo on CPU, nccl on GPU) on its DistributedSampler shard of the global
--batch-size; L_cg gathers features from every rank (open_clip's --gather-with-grad / --local-loss);
L_ct and L_ut are normalised by the global token counts, so the update equals the one-process update
of the same global batch; the log holds the global losses; rank 0 alone logs, shows progress and
writes the checkpoint, which resumes under any number of processes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from collat.fileio import atomic_write, atomic_write_text
from collat.model import CoLLAT, CoLLATConfig, dataclass_from_dict

CHECKPOINT_DIR = "checkpoint"
TRAINER_STATE = "trainer_state.pt"
LOG_NAME = "log.jsonl"
RESULTS_NAME = "results.json"
UNTRAINED_NAME = "untrained_eval.json"
PLOT_NAME = "losses.png"


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainConfig:
    steps: int = 180
    batch_size: int = 32  # global batch (split across ranks under torchrun)
    lr: float = 5e-4
    weight_decay: float = 0.05
    warmup_steps: int = 20
    grad_clip: float = 1.0
    seed: int = 0
    amp: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), else none
    device: str = "auto"  # auto = cuda if available else cpu
    out: str = "runs/collat"
    resume: bool = False
    save_every: int = 50
    train_size: int = 8192  # clips in the training split (rendered on the fly, ~4 ms each)
    data_seed: int = 0
    num_workers: int = 0
    # Audio files instead of the embedded soundfont data: a manifest (CSV/JSONL) or tar shards (a
    # folder, a brace pattern or a list file; see collat.data.shards). Evaluation uses the manifest's
    # eval_split rows that have labels; shard training evaluates nothing.
    train_manifest: str | None = None
    train_shards: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    shuffle_buffer: int = 1000  # samples in the shard stream's shuffle buffer
    eval_size: int = 200  # clips per evaluation set (held-out single-source: eval_size // 2)
    eval_batch_size: int = 64
    eval_noise_std: float = 0.1
    evaluate: bool = True
    stop_at_step: int | None = None  # stop (and checkpoint) after this step, as if interrupted
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return dataclass_from_dict(cls, values)


def cpu_model_config() -> CoLLATConfig:
    """The CPU default (see the module docstring for the two deviations from the paper)."""
    return CoLLATConfig(
        text_encoder="all-MiniLM-L6-v2",
        context_length=24,
        audio_size="tiny",
        clip_seconds=4.0,
        patch_stride=16,
        interaction_depth=4,
        interaction_heads=6,
        lambda_cg=1.0,
        noisy_fraction=0.25,
    )


def paper_model_config() -> CoLLATConfig:
    return CoLLATConfig(
        text_encoder="clip:ViT-B-32",
        audio_size="base",
        clip_seconds=10.0,
        target_frames=1024,  # AST's padding of 10 s clips: 12 x 101 = 1212 audio tokens
        interaction_depth=8,
        interaction_heads=8,
        lambda_cg=0.1,
        noisy_fraction=1.0,
    )


PRESETS = {"cpu": (cpu_model_config, TrainConfig), "paper": (paper_model_config, lambda: TrainConfig(lr=1e-4, steps=20000, save_every=500, num_workers=8))}


# ---------------------------------------------------------------------------------------------- distributed
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


# ---------------------------------------------------------------------------------------------- data
def default_datasets(model_config: CoLLATConfig, train_config: TrainConfig):
    """The embedded soundfont splits: training clips of seen classes and the evaluation sets."""
    from collat.data.soundfont import HELDOUT_CLASSES, SEEN_CLASSES, SoundfontDataset

    common = dict(seed=train_config.data_seed, clip_seconds=model_config.clip_seconds)
    train = SoundfontDataset("train", size=train_config.train_size, classes=SEEN_CLASSES, sources=(1, 3), **common)
    n = train_config.eval_size
    eval_sets = {
        "seen top-1": (SoundfontDataset("test", size=n, classes=SEEN_CLASSES, sources=(1, 1), **common), False),
        "held-out top-1": (SoundfontDataset("test", size=max(n // 2, 1), classes=HELDOUT_CLASSES, sources=(1, 1), **common), False),
        "mixture mAP": (SoundfontDataset("test", size=n, classes=SEEN_CLASSES, sources=(2, 3), seed=train_config.data_seed + 1,
                                         clip_seconds=model_config.clip_seconds), True),
    }
    return train, eval_sets


def file_datasets(model_config: CoLLATConfig, train_config: TrainConfig):
    """(train, eval_sets) from TrainConfig.train_manifest or train_shards; None when neither is set."""
    if train_config.train_manifest and train_config.train_shards:
        raise ValueError("give train_manifest or train_shards, not both")
    if not (train_config.train_manifest or train_config.train_shards):
        return None
    from collat.data.manifest import ManifestDataset, read_manifest

    common = dict(clip_seconds=model_config.clip_seconds, seed=train_config.data_seed)
    if train_config.train_shards:
        from collat.data.shards import ShardDataset

        train = ShardDataset(train_config.train_shards, mode="train", shuffle_buffer=train_config.shuffle_buffer, **common)
        return train, {}
    entries = read_manifest(train_config.train_manifest)
    train = ManifestDataset(entries, split=train_config.train_split, mode="train", **common)
    eval_sets = {}
    rows = [entry for entry in entries if entry.split == train_config.eval_split and entry.labels]
    if train_config.evaluate and rows:
        rows = rows[: train_config.eval_size]
        multi = any(len(entry.labels) > 1 for entry in rows)
        evaluation = ManifestDataset(rows, class_names=train.class_names, mode="eval", text="labels", **common)
        eval_sets[f"{train_config.eval_split} {'mAP' if multi else 'top-1'}"] = (evaluation, multi)
    return train, eval_sets


def epoch_batches(dataset_size: int, batch_size: int, world: World, seed: int, epoch: int) -> list[list[int]]:
    """This rank's batches for an epoch: a DistributedSampler shard (seeded by seed and epoch), cut
    into per-rank batches. The union over ranks of batch s is the 1-process global batch s."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(dataset_size), num_replicas=world.size, rank=world.rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    per_rank = batch_size // world.size
    return [indices[i : i + per_rank] for i in range(0, len(indices) - per_rank + 1, per_rank)]


def batch_stream(dataset, train_config: TrainConfig, world: World, start_step: int):
    """Yields (step, batch) from start_step on; the order depends only on (seed, step), so a resumed
    run sees exactly the batches an uninterrupted run would."""
    from torch.utils.data import DataLoader

    collate = getattr(sys.modules.get(type(dataset).__module__), "collate", None) or _collate
    if isinstance(dataset, torch.utils.data.IterableDataset):
        yield from _iterable_batch_stream(dataset, collate, train_config, world, start_step)
        return
    per_epoch = len(epoch_batches(len(dataset), train_config.batch_size, world, train_config.seed, 0))
    if per_epoch == 0:
        raise ValueError(f"train_size {len(dataset)} is smaller than one batch of {train_config.batch_size}")
    step = start_step
    while True:
        epoch, within = divmod(step, per_epoch)
        batches = epoch_batches(len(dataset), train_config.batch_size, world, train_config.seed, epoch)[within:]
        if hasattr(dataset, "set_epoch"):  # per-epoch random crops / captions (ManifestDataset)
            dataset.set_epoch(epoch)
        # A private generator keeps the DataLoader from drawing on the global torch RNG.
        loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=train_config.num_workers,
                            generator=torch.Generator().manual_seed(train_config.seed + epoch),
                            persistent_workers=False)
        for batch in loader:
            yield step, batch
            step += 1


def _iterable_batch_stream(dataset, collate, train_config: TrainConfig, world: World, start_step: int):
    """Batches of a streaming dataset (ShardDataset: shards split by rank and worker). Every rank yields
    one batch per step for ever, starting the next epoch (set_epoch) when its shards run out, so ranks
    with fewer samples never leave the others waiting in a collective. A resume restarts at the
    beginning of the epoch of start_step (epoch length from sizes.json when known): a stream cannot
    seek, so it is not sample-exact."""
    from torch.utils.data import DataLoader

    per_rank = train_config.batch_size // world.size
    known = getattr(dataset, "num_samples", None)
    per_epoch = known // train_config.batch_size if known else 0
    epoch = start_step // per_epoch if per_epoch else 0
    step = start_step
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=per_rank, drop_last=True, collate_fn=collate,
                            num_workers=train_config.num_workers, persistent_workers=False)
        produced = 0
        for batch in loader:
            produced += 1
            yield step, batch
            step += 1
        if produced == 0:
            raise ValueError(f"rank {world.rank}: the streamed dataset gave no batch of {per_rank} in epoch {epoch}; "
                             f"give at least ranks x workers shards with enough samples")
        epoch += 1


def _collate(items):
    return {"wave": torch.stack([it["wave"] for it in items]), "text": [it["text"] for it in items],
            "labels": torch.stack([it["labels"] for it in items])}


# ---------------------------------------------------------------------------------------------- evaluation
def load_eval_set(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(len(dataset))]
    return torch.stack([it["wave"] for it in items]), torch.stack([it["labels"] for it in items])


def evaluate(model: CoLLAT, eval_sets: dict, noise_std: float = 0.1, batch_size: int = 64) -> dict:
    """Zero-shot top-1 (single-label sets) or macro mAP (multi-label sets), clean and noisy.

    mAP is sklearn's average_precision_score(average="macro") over the classes with a positive clip.
    Noise: Gaussian, std `noise_std`, added to the normalised fbank, seeded (same noise every call).
    """
    from sklearn.metrics import average_precision_score

    results = {}
    for name, (dataset, multi_label) in eval_sets.items():
        waves, labels = dataset if isinstance(dataset, tuple) else load_eval_set(dataset)
        class_names = dataset.class_names if not isinstance(dataset, tuple) else None
        for suffix, std in (("", 0.0), (" noisy", noise_std)):
            scores = model.zero_shot(waves, class_names, multi_label=multi_label, batch_size=batch_size,
                                     noise_std=std).cpu()
            if multi_label:
                present = labels.sum(0) > 0
                value = float(average_precision_score(labels[:, present].numpy(), scores[:, present].numpy(), average="macro"))
            else:
                value = float((scores.argmax(1) == labels.argmax(1)).float().mean())
            results[name + suffix] = value
    return results


def chance_levels(eval_sets: dict) -> dict:
    out = {}
    for name, (dataset, multi_label) in eval_sets.items():
        if not multi_label:
            out[name] = 1.0 / len(dataset.class_names)
    return out


def format_table(untrained: dict, trained: dict, chance: dict | None = None) -> str:
    chance = chance or {}
    lines = [f"{'metric':<26} {'untrained':>10} {'trained':>10} {'chance':>8}", "-" * 57]
    for key in trained:
        base = key.removesuffix(" noisy")
        c = f"{chance[base]:.3f}" if base in chance else "-"
        lines.append(f"{key:<26} {untrained.get(key, float('nan')):>10.3f} {trained[key]:>10.3f} {c:>8}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checkpoints
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


def save_checkpoint(out: str, model: CoLLAT, optimizer, scheduler, step: int, train_config: TrainConfig,
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


def load_checkpoint(path: str, model: CoLLAT, optimizer, scheduler, world: World | None = None,
                    seed: int = 0) -> int:
    """Load weights, optimizer, scheduler and RNG states; returns the step to continue from.

    RNG: one process restores the saved (rank-0) state, bit-exact. K processes restore their own
    rank's state when the checkpoint was written by K processes, else (another world size) they
    reseed per rank from (seed, rank, step): the data order still follows the step, the noise does not."""
    from safetensors.torch import load_file

    saved_config = CoLLAT.read_config(path)
    if dataclasses.asdict(saved_config) | {"fused": None} != dataclasses.asdict(model.config) | {"fused": None}:
        raise ValueError(f"checkpoint {path} was written with another model config; resume with the same options")
    model.load_weights(load_file(os.path.join(path, "model.safetensors"), device=str(model.device)))
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


# ---------------------------------------------------------------------------------------------- logging
def truncate_log(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(keep))


def read_log(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, key in zip(axes, ("loss", "l_ct", "l_cg", "l_ut")):
        ax.plot(steps, [r[key] for r in rows], lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- training
def build_optimizer(model: CoLLAT, train_config: TrainConfig, device: torch.device):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name in ("logit_scale",) or "position_embeddings" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": train_config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=train_config.lr, betas=(0.9, 0.98), eps=1e-6, fused=fused)

    def schedule(step: int) -> float:  # linear warmup, then cosine to 0
        if step < train_config.warmup_steps:
            return (step + 1) / train_config.warmup_steps
        progress = (step - train_config.warmup_steps) / max(1, train_config.steps - train_config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        # The same signal twice: stop at once. Another one is not counted: a Ctrl-C under torchrun
        # reaches each worker as SIGINT from the terminal and SIGTERM from torchrun.
        if self.signal == name:
            raise KeyboardInterrupt
        self.signal = self.signal or name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> str:
    """bf16 autocast pays off on GPUs and on CPUs with bf16 instructions; without them (e.g. AVX2-only
    CPUs) PyTorch emulates bf16 and a step gets ~3x slower than fp32, so "auto" picks fp32 there."""
    if amp != "auto":
        return amp
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bf16"
    return "none"


def autocast(device: torch.device, amp: str):
    amp = resolve_amp(amp, device)
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "none":
        return contextlib.nullcontext()
    raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")


def run(model_config: CoLLATConfig | None = None, train_config: TrainConfig | None = None,
        train_dataset=None, eval_sets: dict | None = None, model: CoLLAT | None = None) -> dict:
    """Train, then evaluate. Returns a dict with the final step, status, the last losses and the
    evaluation results (untrained and trained). Datasets default to the embedded soundfont data.

    Under torchrun (WORLD_SIZE > 1) it joins the process group, and destroys it at the end or on an
    error if it created it. Logged losses are the global batch's (the mean of the ranks' shares)."""
    model_config = model_config or cpu_model_config()
    train_config = train_config or TrainConfig()
    world, device = setup_distributed(train_config.device)
    try:
        return _run(model_config, train_config, train_dataset, eval_sets, model, world, device)
    finally:
        if world.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(model_config: CoLLATConfig, train_config: TrainConfig, train_dataset, eval_sets, model, world: World,
         device: torch.device) -> dict:
    out = train_config.out
    if world.is_main:
        os.makedirs(out, exist_ok=True)
    if train_config.batch_size % world.size:
        raise ValueError(f"batch_size {train_config.batch_size} must be divisible by the world size {world.size}")

    files = file_datasets(model_config, train_config) if train_dataset is None else None
    if files is not None:
        train_dataset, file_eval_sets = files
        eval_sets = eval_sets if eval_sets is not None else file_eval_sets
    if train_dataset is None or (eval_sets is None and train_config.evaluate):
        default_train, default_eval = default_datasets(model_config, train_config)
        train_dataset = train_dataset if train_dataset is not None else default_train
        eval_sets = eval_sets if eval_sets is not None else default_eval

    seed_everything(train_config.seed)
    if model is None:
        model = CoLLAT(model_config)
    model.to(device)
    if hasattr(train_dataset, "class_names") and hasattr(model.text, "tokenizer"):
        _check_prompt_length(model, train_dataset.class_names)
    optimizer, scheduler = build_optimizer(model, train_config, device)

    log_path = os.path.join(out, LOG_NAME)
    start_step = 0
    checkpoint = find_checkpoint(out) if train_config.resume else None
    if train_config.resume and checkpoint is None and world.is_main:
        print(f"--resume: no checkpoint in {out}; starting from scratch", file=sys.stderr)
    if checkpoint is not None:
        start_step = load_checkpoint(checkpoint, model, optimizer, scheduler, world, train_config.seed)
        if world.is_main:
            truncate_log(log_path, start_step - 1)
            print(f"resumed from {checkpoint} at step {start_step}")
    else:
        if world.is_main and os.path.exists(log_path):
            os.remove(log_path)
        if world.size > 1:  # the model is built; from here on each rank draws its own noise
            seed_everything(rank_seed(train_config.seed, world.rank))

    untrained_path = os.path.join(out, UNTRAINED_NAME)
    untrained = None
    if train_config.evaluate and world.is_main:
        if os.path.isfile(untrained_path) and checkpoint is not None:
            with open(untrained_path) as f:
                untrained = json.load(f)
        else:
            state = rng_state()  # evaluation must not shift the training RNG streams
            untrained = evaluate(model, eval_sets, train_config.eval_noise_std, train_config.eval_batch_size)
            set_rng_state(state)
            atomic_write_text(untrained_path, json.dumps(untrained, indent=2))

    train_module = model
    if world.size > 1:
        # No buffer changes during training (no batch norm), so DDP need not broadcast them every step;
        # its constructor still copies rank 0's parameters and buffers to every rank once.
        train_module = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)

    status, last = "completed", {}
    end_step = train_config.steps if train_config.stop_at_step is None else min(train_config.steps, train_config.stop_at_step)
    bar = None
    if train_config.progress and world.is_main:
        from tqdm import tqdm

        bar = tqdm(total=train_config.steps, initial=start_step, desc="train", dynamic_ncols=True)
    done = start_step
    model.train()
    with _StopFlag() as stop, open(log_path, "a") if world.is_main else contextlib.nullcontext() as log_file:
        stream = batch_stream(train_dataset, train_config, world, start_step) if start_step < end_step else iter(())
        tick = time.perf_counter()
        for step, batch in stream:
            with autocast(device, train_config.amp):
                terms = train_module(batch["wave"].to(device, non_blocking=True), batch["text"])
            loss = terms["loss"]
            finite = torch.isfinite(loss.detach()).float()
            if world.size > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() < 1:
                kept = find_checkpoint(out)
                raise NonFiniteLossError(
                    f"non-finite loss at step {step}: " + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in terms.items())
                    + f". Training stopped; the last good checkpoint is {kept or 'none (none was written yet)'}. "
                    "Try a lower --lr, --amp none, or a smaller --grad-clip."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), train_config.grad_clip)
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(max=math.log(100.0))
            # One collective: the global losses (mean of the ranks' shares) and whether any rank got a
            # signal -- torchrun signals every rank, but not necessarily within the same step.
            names = list(terms)
            values = reduce_mean([float(terms[k].detach()) for k in names] + [float(stop.signal is not None)],
                                 device, world)
            signalled = values.pop() > 0
            now = time.perf_counter()
            record = {"step": step, **dict(zip(names, values)), "grad_norm": float(grad_norm),
                      "lr": scheduler.get_last_lr()[0], "samples_per_s": train_config.batch_size / (now - tick)}
            tick = now
            last = record
            if world.is_main:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ct=f"{record['l_ct']:.3f}", cg=f"{record['l_cg']:.3f}",
                                    ut=f"{record['l_ut']:.4f}", sps=f"{record['samples_per_s']:.1f}")
            done = step + 1
            if signalled:
                status = f"interrupted by {stop.signal or 'a signal to another rank'}"
            elif done >= end_step:
                status = "completed" if done >= train_config.steps else "stopped"
            if status != "completed" or done % train_config.save_every == 0 or done >= train_config.steps:
                _save_on_main(out, model, optimizer, scheduler, done, train_config, world)
            if status != "completed" or done >= train_config.steps:
                break
    if bar is not None:
        bar.close()

    step = done
    result = {"status": status, "step": step, "last": last, "out": out}
    if world.is_main:
        plot_losses(log_path, os.path.join(out, PLOT_NAME))
    if hasattr(train_dataset, "skipped"):  # unreadable files skipped (manifest / shard data)
        result["skipped_files"] = _report_skipped(train_dataset, device, world)
    if status.startswith("interrupted") or status == "stopped":
        if world.is_main:
            print(f"{status} at step {step}; checkpoint in {os.path.join(out, CHECKPOINT_DIR)} (continue with --resume)")
        return result
    if train_config.evaluate and world.is_main:
        trained = evaluate(model, eval_sets, train_config.eval_noise_std, train_config.eval_batch_size)
        chance = chance_levels(eval_sets)
        print("\n" + format_table(untrained, trained, chance))
        result.update(untrained=untrained, trained=trained, chance=chance)
        payload = {"model_config": dataclasses.asdict(model.config), "train_config": dataclasses.asdict(train_config),
                   **result}
        atomic_write_text(os.path.join(out, RESULTS_NAME), json.dumps(payload, indent=2))
    if world.size > 1:
        dist.barrier()  # rank 0's evaluation and files are done before any rank leaves the group
    return result


def _report_skipped(dataset, device: torch.device, world: World) -> int:
    """Print (rank 0) and return the count of unreadable files skipped, summed over the ranks."""
    skipped = int(round(reduce_mean([float(dataset.skipped)], device, world)[0] * world.size))
    if world.is_main:
        if world.size == 1 and hasattr(dataset, "summary"):
            dataset.summary()
        else:
            print(f"collat.data: {skipped} unreadable audio file(s) skipped (summed over {world.size} rank(s))",
                  file=sys.stderr if skipped else sys.stdout, flush=True)
    return skipped


def _save_on_main(out: str, model: CoLLAT, optimizer, scheduler, step: int, train_config: TrainConfig,
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


def _check_prompt_length(model: CoLLAT, class_names: list[str]) -> None:
    """Fail early if the longest 3-class prompt would not fit the text context length."""
    from collat.model import make_prompt

    tokenizer = model.text.tokenizer
    if not hasattr(tokenizer, "__call__") or not hasattr(tokenizer, "model_max_length"):
        return  # open_clip's tokenizer: 77 tokens hold any prompt of this data set
    by_length = sorted(class_names, key=lambda n: len(tokenizer(n)["input_ids"]), reverse=True)
    prompt = make_prompt(by_length[:3])
    needed = len(tokenizer(prompt)["input_ids"])
    if needed > model.context_length:
        raise ValueError(
            f"the longest prompt {prompt!r} needs {needed} tokens but the text context length is "
            f"{model.context_length}; raise --context-length"
        )


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> tuple[CoLLATConfig, TrainConfig]:
    p = argparse.ArgumentParser(
        prog="python -m collat.train",
        description=__doc__.split("\n\n")[0] + " With no arguments: the CPU default (~10 min on 2 cores).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:4]),
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="cpu: tiny AST + MiniLM, lambda_cg=1.0, noisy_fraction=0.25 (default); paper: AST-base, CLIP ViT-B-32, "
                        "8 blocks, 10 s clips, lambda=(1, 0.1, 0.01), noisy_fraction=1.0 (for a GPU)")
    p.add_argument("--config", help="JSON file {\"model\": {CoLLATConfig fields}, \"train\": {TrainConfig fields}} "
                                     "applied over the preset; command-line options win")
    p.add_argument("--matching", choices=["greedy", "optimal"])
    p.add_argument("--reference-ops", action="store_true", help="plain-PyTorch reference ops instead of the fused ones")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--out", help="run directory (default runs/collat)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint (bit-exact on CPU)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["auto", "bf16", "none"], help="auto (default): bf16 autocast on CUDA and on "
                   "CPUs with native bf16, fp32 elsewhere (emulated bf16 is ~3x slower than fp32)")
    p.add_argument("--seed", type=int)
    p.add_argument("--text-encoder", help="all-MiniLM-L6-v2 or clip:<open_clip model> (e.g. clip:ViT-B-32)")
    p.add_argument("--text-checkpoint", help="MiniLM model dir or open_clip checkpoint file")
    p.add_argument("--context-length", type=int)
    p.add_argument("--audio-size", choices=["micro", "tiny", "small", "base"])
    p.add_argument("--audio-checkpoint", help="local AST checkpoint directory (sets the window to 'hanning')")
    p.add_argument("--clip-seconds", type=float)
    p.add_argument("--depth", type=int, help="interaction blocks")
    p.add_argument("--lambda-ct", type=float)
    p.add_argument("--lambda-cg", type=float, help="paper 0.1; the CPU default uses 1.0 because 0.1 stalls at "
                                                   "ln(batch) for ~220 steps (DESIGN.md section 5)")
    p.add_argument("--lambda-ut", type=float)
    p.add_argument("--noisy-fraction", type=float, help="fraction of the batch with a noisy twin for L_ut (paper 1.0)")
    p.add_argument("--stop-grad-clean", action="store_true", help="stop-gradient on the clean branch of L_ut")
    p.add_argument("--gather-with-grad", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, L_cg gathers features with gradients (open_clip; default on: the "
                        "gradient equals the one-process gradient of the global batch)")
    p.add_argument("--local-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="under torchrun, L_cg over this rank's rows against all ranks' columns (open_clip; "
                        "O(B/K x B) logits instead of O(B x B); exact together with --gather-with-grad)")
    p.add_argument("--train-manifest", help="train on the audio files of this CSV/JSONL manifest (rows of "
                   "--train-split; evaluate on the labelled rows of --eval-split)")
    p.add_argument("--train-shards", help="train on WebDataset tar shards (folder with sizes.json/classes.json, "
                   "brace pattern or list file); shards are split by rank and DataLoader worker")
    p.add_argument("--train-split", help="manifest split to train on (default train)")
    p.add_argument("--eval-split", help="manifest split to evaluate on (default test)")
    p.add_argument("--train-size", type=int)
    p.add_argument("--eval-size", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--save-every", type=int)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluations")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)

    make_model, make_train = PRESETS[args.preset]
    model_values, train_values = dataclasses.asdict(make_model()), dataclasses.asdict(make_train())
    if args.config:
        if not os.path.isfile(args.config):
            p.error(f"--config file not found: {args.config}")
        with open(args.config) as f:
            payload = json.load(f)
        unknown = set(payload) - {"model", "train"}
        if unknown:
            p.error(f"--config: top-level keys must be 'model' and 'train', got {sorted(unknown)}")
        model_values.update(payload.get("model", {}))
        train_values.update(payload.get("train", {}))
    model_flags = {"matching": "matching", "text_encoder": "text_encoder", "text_checkpoint": "text_checkpoint",
                   "context_length": "context_length", "audio_size": "audio_size", "audio_checkpoint": "audio_checkpoint",
                   "clip_seconds": "clip_seconds", "depth": "interaction_depth", "lambda_ct": "lambda_ct",
                   "lambda_cg": "lambda_cg", "lambda_ut": "lambda_ut", "noisy_fraction": "noisy_fraction",
                   "gather_with_grad": "gather_with_grad", "local_loss": "local_loss"}
    for flag, field_name in model_flags.items():
        if getattr(args, flag) is not None:
            model_values[field_name] = getattr(args, flag)
    if args.text_encoder and args.text_encoder.startswith("clip:") and args.context_length is None:
        model_values["context_length"] = None
    if args.reference_ops:
        model_values["fused"] = False
    if args.stop_grad_clean:
        model_values["stop_grad_clean"] = True
    if args.audio_checkpoint:
        model_values["window_type"] = "hanning"
    train_flags = ("steps", "batch_size", "lr", "out", "device", "amp", "seed", "train_size", "eval_size",
                   "num_workers", "save_every", "train_manifest", "train_shards", "train_split", "eval_split")
    for flag in train_flags:
        if getattr(args, flag) is not None:
            train_values[flag] = getattr(args, flag)
    if args.resume:
        train_values["resume"] = True
    if args.no_eval:
        train_values["evaluate"] = False
    if args.no_progress:
        train_values["progress"] = False
    try:
        return CoLLATConfig.from_dict(model_values), TrainConfig.from_dict(train_values)
    except (TypeError, ValueError) as e:
        p.error(str(e))


def main(argv=None) -> int:
    model_config, train_config = parse_args(argv)
    try:
        run(model_config, train_config)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
