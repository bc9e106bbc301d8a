"""Data: the embedded soundfont generator, manifests, dataset readers and shards.

Every data set yields the same item dict: {"wave": float32 [T], "labels": float32 multi-hot [C],
"text": prompt or caption, "names": [class names]}; `collate` batches them.
"""
from collat.data.audio_io import AudioReadError, load_audio
from collat.data.manifest import (
    ManifestDataset,
    ManifestEntry,
    check_files_exist,
    class_names_of,
    read_manifest,
    write_manifest,
)
from collat.data.readers import audioset_entries, esc50_entries, fsd50k_entries, urbansound8k_entries
from collat.data.shards import ShardDataset, shard_urls, write_shards
from collat.data.soundfont import (
    CLASSES,
    HELDOUT_CLASSES,
    SEEN_CLASSES,
    SoundClass,
    SoundfontDataset,
    class_prompts,
    collate,
    find_soundfont,
    make_prompt,
)

__all__ = [
    "CLASSES", "HELDOUT_CLASSES", "SEEN_CLASSES", "SoundClass", "SoundfontDataset", "class_prompts", "collate",
    "find_soundfont", "make_prompt",
    "AudioReadError", "load_audio",
    "ManifestDataset", "ManifestEntry", "check_files_exist", "class_names_of", "read_manifest", "write_manifest",
    "audioset_entries", "esc50_entries", "fsd50k_entries", "urbansound8k_entries",
    "ShardDataset", "shard_urls", "write_shards",
]
