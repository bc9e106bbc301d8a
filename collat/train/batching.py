"""What a training run reads: the training data set, the evaluation sets, and the batch stream.

The batch order depends only on (seed, step), so a resumed run sees exactly the batches an
uninterrupted run would; under torchrun each rank reads its DistributedSampler shard of the global batch.
"""
from __future__ import annotations

import sys

import torch

from collat.config import CoLLATConfig, TrainConfig
from collat.data.collate import collate
from collat.train.distributed import World

EVAL_SET_NAMES = {"soundfont/seen-single": "seen top-1", "soundfont/heldout-single": "held-out top-1",
                  "soundfont/seen-mixture": "mixture mAP"}


def datasets(model_config: CoLLATConfig, train_config: TrainConfig):
    """(training data set, {name: evaluation ClipSet}): the embedded soundfont data, a manifest's rows
    or tar shards; evaluated on the labelled eval_split rows of eval_manifest (default: the training
    manifest's), else on the embedded test sets (embedded data) or on nothing (shards)."""
    if train_config.train_manifest and train_config.train_shards:
        raise ValueError("give train_manifest or train_shards, not both")
    common = dict(clip_seconds=model_config.clip_seconds, seed=train_config.data_seed)
    eval_manifest = train_config.eval_manifest or train_config.train_manifest
    if train_config.train_shards:
        from collat.data.shards import ShardDataset

        train = ShardDataset(train_config.train_shards, mode="train", shuffle_buffer=train_config.shuffle_buffer,
                             **common)
    elif train_config.train_manifest:
        from collat.data.manifest import ManifestDataset

        train = ManifestDataset(train_config.train_manifest, split=train_config.train_split, mode="train", **common)
    else:
        from collat.data.soundfont import SEEN_CLASSES, SoundfontDataset

        train = SoundfontDataset("train", size=train_config.train_size, classes=SEEN_CLASSES, sources=(1, 3),
                                 variety=train_config.render_variety, **common)
    if not train_config.evaluate:
        return train, {}
    if eval_manifest:
        return train, manifest_eval_sets(eval_manifest, train_config, model_config.clip_seconds)
    if train_config.train_shards:
        print("collat.train: training from shards evaluates nothing unless --eval-manifest names a manifest",
              file=sys.stderr)
        return train, {}
    return train, embedded_eval_sets(train_config, model_config.clip_seconds)


def embedded_eval_sets(train_config: TrainConfig, clip_seconds: float) -> dict:
    from collat.evaluate.sets import embedded_sets

    sets = embedded_sets(clip_seconds, test_size=train_config.eval_size, train_size=0, seed=train_config.data_seed,
                         probe=False)
    return {EVAL_SET_NAMES[clip_set.name]: clip_set for clip_set in sets}


def manifest_eval_sets(manifest: str, train_config: TrainConfig, clip_seconds: float) -> dict:
    """The manifest's labelled eval_split rows (at most eval_size), when it has any."""
    from collat.data.manifest import read_manifest
    from collat.evaluate.sets import manifest_sets

    entries = read_manifest(manifest)
    if not any(entry.split == train_config.eval_split and entry.labels for entry in entries):
        if train_config.eval_manifest:
            raise ValueError(f"--eval-manifest {manifest} has no labelled rows in split {train_config.eval_split!r} "
                             "(--eval-split)")
        return {}
    (clip_set,) = manifest_sets(manifest, clip_seconds, split=train_config.eval_split, train_split=None,
                                max_clips=train_config.eval_size, labelled_only=True)
    return {f"{train_config.eval_split} {'mAP' if clip_set.multi_label else 'top-1'}": clip_set}


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

    if isinstance(dataset, torch.utils.data.IterableDataset):
        yield from _iterable_batch_stream(dataset, train_config, world, start_step)
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


def _iterable_batch_stream(dataset, train_config: TrainConfig, world: World, start_step: int):
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
