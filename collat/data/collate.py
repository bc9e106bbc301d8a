"""The one collate function: item dicts of any collat data set -> a batch (the DataLoader collate_fn)."""
from __future__ import annotations

import numpy as np
import torch


def collate(batch: list[dict]) -> dict:
    """{"wave": [B, T], "labels": [B, C], "text": [B strings], "names": [B lists]} from item dicts
    (SoundfontDataset, ManifestDataset, ShardDataset or any dataset with "wave", "labels" and "text")."""
    if not batch:
        raise ValueError("collate: got an empty batch")
    # numpy's single-threaded copy: torch.stack's intra-op threads cost 10-50x more on a busy CPU.
    return {
        "wave": torch.from_numpy(np.stack([np.asarray(item["wave"]) for item in batch])),
        "labels": torch.from_numpy(np.stack([np.asarray(item["labels"]) for item in batch])),
        "text": [item["text"] for item in batch],
        "names": [list(item.get("names", ())) for item in batch],
    }
