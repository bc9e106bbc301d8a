"""Data: the embedded soundfont generator, manifests, dataset readers and shards.

Every data set yields the same item dict: {"wave": float32 [T], "labels": float32 multi-hot [C],
"text": prompt or caption, "names": [class names]}; `collate` batches them.
"""
from collat.data.audio_io import AudioReadError, audio_info, load_audio
from collat.data.collate import collate
from collat.data.gm_sounds import CLASSES, HELDOUT_CLASSES, SEEN_CLASSES, SoundClass
from collat.data.manifest import (
    ManifestDataset,
    ManifestEntry,
    UnreadableDataError,
    check_files_exist,
    class_names_of,
    read_manifest,
    write_manifest,
)
from collat.data.soundfont import SoundfontDataset, find_soundfont

__all__ = [
    "CLASSES", "HELDOUT_CLASSES", "SEEN_CLASSES", "SoundClass", "SoundfontDataset", "collate", "find_soundfont",
    "AudioReadError", "audio_info", "load_audio",
    "ManifestDataset", "ManifestEntry", "UnreadableDataError", "check_files_exist", "class_names_of", "read_manifest", "write_manifest",
    "audioset_entries", "esc50_entries", "fsd50k_entries", "urbansound8k_entries",
    "ShardDataset", "shard_urls", "write_shards",
]

# readers and shards are also command lines (python -m collat.data.readers / .shards): importing them
# here would make runpy warn, and shards pulls in webdataset. Load them on first use.
_LAZY = {
    "audioset_entries": "readers", "esc50_entries": "readers", "fsd50k_entries": "readers",
    "urbansound8k_entries": "readers", "ShardDataset": "shards", "shard_urls": "shards", "write_shards": "shards",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"collat.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'collat.data' has no attribute {name!r}")
