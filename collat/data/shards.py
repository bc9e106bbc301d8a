"""WebDataset tar shards for streaming at scale, in LAION-CLAP's layout.

Each sample is two members of a tar file sharing a key: `{key}.flac` (mono, the target sample rate,
16-bit) and `{key}.json` with `{"text": [captions], "tag": [labels], "split": ..., "original_path":
...}` (LAION-CLAP's keys; its own shards read here too). Beside the shards, `sizes.json` maps each
shard file name to its sample count (as LAION-CLAP) and `classes.json` lists the class names of the
whole manifest, so shards of every split share one label index.

    write_shards("manifest.csv", "shards/train", split="train")   # or: python -m collat.data.shards ...
    data = ShardDataset("shards/train", mode="train")     # split by node (torchrun rank) and worker
    # the shards are named shard-000000.tar, shard-000001.tar, ...: the folder (its sizes.json lists
    # them) or the brace pattern "shards/train/shard-{000000..000999}.tar" name the same files
    loader = torch.utils.data.DataLoader(data, batch_size=32, collate_fn=collate, num_workers=4)

Audio is resampled once, at conversion; decoding a shard sample then only crops or pads it.
"""
from __future__ import annotations

import json
import os
import sys
import zlib

import numpy as np
import torch
import webdataset as wds

from collat.data.audio_io import AudioReadError, decode_audio, encode_flac, load_audio
from collat.data.manifest import (
    TEXT_SOURCES,
    ManifestEntry,
    SkipCounter,
    class_names_of,
    make_item,
    read_manifest,
    report_skip,
)

AUDIO_KEYS = ("flac", "wav", "ogg", "mp3")
SIZES_FILE = "sizes.json"
CLASSES_FILE = "classes.json"
SIZES_WHAT = "an object mapping each shard file name to its sample count"


def write_shards(manifest, out_dir, split: str | None = None, samples_per_shard: int = 1000,
                 sample_rate: int = 16000, prefix: str = "shard", root: str | None = None,
                 class_names: list[str] | None = None) -> dict:
    """Convert manifest rows (of `split`, or all) into tar shards in `out_dir`.

    Unreadable files are reported, skipped and counted. Returns {"sizes": {shard: n}, "samples": n,
    "skipped": n, "class_names": [...]}.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    entries = read_manifest(manifest, root) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    if not all(isinstance(entry, ManifestEntry) for entry in entries):
        raise TypeError("manifest must be a path or a list of ManifestEntry")
    class_names = list(class_names) if class_names is not None else class_names_of(entries)
    chosen = [entry for entry in entries if split is None or entry.split == split]
    if not chosen:
        raise ValueError(f"no manifest rows for split {split!r}")
    os.makedirs(out_dir, exist_ok=True)
    sizes, skipped, written = {}, 0, 0
    writer, shard_name = None, None

    def close_shard():
        if writer is not None:
            writer.close()
            os.replace(os.path.join(out_dir, shard_name + ".tmp"), os.path.join(out_dir, shard_name))

    from tqdm import tqdm

    for entry in tqdm(chosen, desc=f"writing shards to {out_dir}", disable=None, leave=False, dynamic_ncols=True):
        try:
            wave = load_audio(entry.path, sample_rate)
        except AudioReadError as error:
            skipped += 1
            report_skip(error, skipped)
            continue
        if written % samples_per_shard == 0:
            close_shard()
            shard_name = f"{prefix}-{len(sizes):06d}.tar"
            sizes[shard_name] = 0
            writer = wds.TarWriter(os.path.join(out_dir, shard_name + ".tmp"))
        meta = {"text": entry.captions, "tag": entry.labels, "split": entry.split, "original_path": entry.path}
        writer.write({"__key__": f"{written:09d}", "flac": encode_flac(wave, sample_rate),
                      "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        sizes[shard_name] += 1
        written += 1
    close_shard()
    with open(os.path.join(out_dir, SIZES_FILE), "w") as handle:
        json.dump(sizes, handle, indent=1)
    with open(os.path.join(out_dir, CLASSES_FILE), "w") as handle:
        json.dump(class_names, handle, indent=1, ensure_ascii=False)
    print(f"collat.data: wrote {written} samples in {len(sizes)} shard(s) to {out_dir}; "
          f"{skipped} unreadable file(s) skipped", file=sys.stderr if skipped else sys.stdout)
    return {"sizes": sizes, "samples": written, "skipped": skipped, "class_names": class_names}


def read_folder_json(path: str, kind: type, what: str):
    """sizes.json ({shard: count}) or classes.json ([names]) beside the shards, checked."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (ValueError, OSError) as error:
        raise ValueError(f"{path} is not readable JSON ({error})") from None
    valid = isinstance(value, kind) and (
        all(isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0 for k, n in value.items())
        if kind is dict else all(isinstance(name, str) for name in value))
    if not valid:
        raise ValueError(f"{path} must hold {what}, got {json.dumps(value)[:80]}")
    return value


def shard_urls(source) -> list[str]:
    """Tar paths from a shard folder (its sizes.json, else every .tar), a brace pattern, or a list."""
    if isinstance(source, (list, tuple)):
        return [os.fspath(url) for url in source]
    source = os.fspath(source)
    if os.path.isdir(source):
        sizes_path = os.path.join(source, SIZES_FILE)
        if os.path.isfile(sizes_path):
            return [os.path.join(source, name) for name in read_folder_json(sizes_path, dict, SIZES_WHAT)]
        urls = sorted(os.path.join(source, name) for name in os.listdir(source) if name.endswith(".tar"))
        if not urls:
            raise FileNotFoundError(f"no .tar shards in {source}")
        return urls
    return list(wds.shardlists.expand_urls(source))


def _shard_sizes(urls: list[str]) -> int | None:
    """The total sample count from the sizes.json files next to the shards, if every shard is listed."""
    total, cache = 0, {}
    for url in urls:
        folder, name = os.path.split(url)
        if folder not in cache:
            path = os.path.join(folder, SIZES_FILE)
            cache[folder] = {}
            if os.path.isfile(path):
                cache[folder] = read_folder_json(path, dict, SIZES_WHAT)
        if name not in cache[folder]:
            return None
        total += cache[folder][name]
    return total


def _strings(value, key: str, where: str) -> list[str]:
    """A .json value that must be a string (one item) or a list of strings; absent/null is empty."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v.strip()]
    raise AudioReadError(where, f"malformed .json: {key!r} must be a string or a list of strings, got {value!r:.80}")


def sample_text_and_labels(raw: bytes, where: str) -> tuple[list[str], list[str]]:
    """(captions, labels) of a sample's .json: LAION-CLAP's {"text": ..., "tag": ...}; a string "tag" is
    one label (not its letters). A member that is not such an object raises AudioReadError."""
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AudioReadError(where, f"unreadable .json ({error})") from None
    if not isinstance(meta, dict):
        raise AudioReadError(where, f"malformed .json: expected an object with 'text' and/or 'tag', got "
                                    f"{type(meta).__name__}")
    return _strings(meta.get("text"), "text", where), [name.strip() for name in _strings(meta.get("tag"), "tag", where)]


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples streamed from tar shards, as item dicts like SoundfontDataset's.

    Shards are split by node (torchrun's RANK/WORLD_SIZE, or the initialised process group) and then
    by DataLoader worker, so every sample is read once per epoch across all ranks and workers; give
    at least ranks x workers shards. In train mode the shard order is shuffled with
    `np.random.default_rng([seed, epoch])` (the same on every rank, so the split stays disjoint;
    call `set_epoch`), samples pass through an optional shuffle buffer, and crops and caption
    choice are random per sample from `[seed, epoch, crc32(key)]`. Corrupt samples or shards are
    reported with their path, skipped and counted in `skipped`.
    """

    def __init__(self, shards, class_names: list[str] | None = None, sample_rate: int = 16000,
                 clip_seconds: float | None = 10.0, mode: str = "eval", seed: int = 0, text: str = "auto",
                 crop: str = "start", shuffle_buffer: int = 0):
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if text not in TEXT_SOURCES:
            raise ValueError(f"text must be one of {TEXT_SOURCES}, got {text!r}")
        self.urls = shard_urls(shards)
        missing = [url for url in self.urls if "://" not in url and not os.path.isfile(url)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard file(s) missing, e.g. {missing[:5]}")
        if class_names is None:
            folder = os.path.dirname(self.urls[0]) if self.urls else ""
            classes_path = os.path.join(folder, CLASSES_FILE)
            if not os.path.isfile(classes_path):
                raise ValueError(f"class_names not given and no {CLASSES_FILE} beside the shards in {folder!r}")
            class_names = read_folder_json(classes_path, list, "a list of class names")
        self.class_names = list(class_names)
        self.class_index = {name: k for k, name in enumerate(self.class_names)}
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds
        self.mode = mode
        self.seed = seed
        self.text = text
        self.crop = crop
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.num_samples = _shard_sizes(self.urls)
        self._skips = SkipCounter()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def skipped(self) -> int:
        return self._skips.value

    def _on_tar_error(self, error: Exception) -> bool:
        # webdataset appends the shard's url (or its sample dict) to the exception's args.
        self._skips.add()
        report_skip(AudioReadError("shard", f"corrupt or unreadable tar data ({error!r})"), self._skips.value, "sample")
        return True

    def _decode(self, sample: dict) -> dict:
        """The item of one sample; AudioReadError (skipped and counted) when a member is missing or malformed."""
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        audio_key = next((key for key in AUDIO_KEYS if key in sample), None)
        if audio_key is None or "json" not in sample:
            raise AudioReadError(where, f"sample lacks an audio member ({'/'.join(AUDIO_KEYS)}) or its .json")
        captions, labels = sample_text_and_labels(sample["json"], where)
        unknown = [name for name in labels if name not in self.class_index]
        if unknown:
            raise AudioReadError(where, f"labels {unknown} of its .json are not in class_names")
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(sample["__key__"].encode())])
        wave = decode_audio(sample[audio_key], self.sample_rate, self.clip_seconds, self.mode, rng, self.crop,
                            name=where)
        try:
            return make_item(wave, labels, captions, self.class_index, self.text, self.mode == "train", rng, where)
        except ValueError as error:  # no text for the asked text source
            raise AudioReadError(where, str(error).removeprefix(f"{where}: ")) from None

    def _ordered_urls(self) -> list[str]:
        if self.mode != "train":
            return list(self.urls)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.urls))
        return [self.urls[k] for k in order]

    def _samples(self):
        source = ({"url": url} for url in self._ordered_urls())
        source = wds.split_by_worker(wds.split_by_node(source))
        for sample in wds.tarfile_to_samples(handler=self._on_tar_error)(source):
            try:
                yield self._decode(sample)
            except AudioReadError as error:
                self._skips.add()
                report_skip(error, self._skips.value, "sample")

    def __iter__(self):
        if self.shuffle_buffer <= 1 or self.mode != "train":
            yield from self._samples()
            return
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, self.epoch, 1 + worker, int(os.environ.get("RANK", 0))])
        buffer = []
        for item in self._samples():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            k = int(rng.integers(len(buffer)))
            buffer[k], item = item, buffer[k]
            yield item
        order = rng.permutation(len(buffer))
        yield from (buffer[k] for k in order)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description="Convert a collat manifest into WebDataset tar shards.")
    parser.add_argument("manifest", help=".csv or .jsonl manifest")
    parser.add_argument("out_dir", help="folder for the shards, sizes.json and classes.json")
    parser.add_argument("--split", help="only rows of this split (default: all rows)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--root", help="folder that relative paths in the manifest are relative to")
    args = parser.parse_args(argv)
    write_shards(args.manifest, args.out_dir, split=args.split, samples_per_shard=args.samples_per_shard,
                 sample_rate=args.sample_rate, root=args.root)


if __name__ == "__main__":
    main()
