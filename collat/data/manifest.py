"""Manifests of real audio: one row per clip, and a Dataset over them with the SoundfontDataset item format.

Format, CSV (header row required; extra columns are ignored):

    path,labels,caption,split
    audio/1-100032-A-0.wav,dog,,train
    clips/abc.flac,Speech;Music,,test
    clips/x.wav,,A dog barks twice,train

or JSON Lines (one object per line):

    {"path": "clips/abc.flac", "labels": ["Speech", "Music"], "split": "test"}
    {"path": "clips/x.wav", "captions": ["A dog barks twice", "Two barks"], "split": "train"}

- `path`: absolute, or relative to the manifest file's folder (or to `root=` when given).
- `labels`: class names; a list in JSONL, `;`-separated in CSV (names may contain commas).
- `caption` (one string) / `captions` (a list; in CSV the `caption` column holds one caption).
- `split`: free text, usually train / val / test; empty when the manifest is not split.

A row needs a path; it may have labels, captions, both, or (for prediction) neither.
"""
from __future__ import annotations

import csv
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from collat.data.audio_io import AudioReadError, load_audio
from collat.prompts import make_prompt

LABEL_SEPARATOR = ";"
CSV_COLUMNS = ("path", "labels", "caption", "split")
TEXT_SOURCES = ("auto", "labels", "caption")


@dataclass
class ManifestEntry:
    path: str
    labels: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    split: str = ""

    def to_json(self) -> dict:
        row = {"path": self.path}
        if self.labels:
            row["labels"] = list(self.labels)
        if self.captions:
            row["captions"] = list(self.captions)
        if self.split:
            row["split"] = self.split
        return row


def _manifest_format(path: str) -> str:
    lower = os.fspath(path).lower()
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    raise ValueError(f"manifest path must end in .csv or .jsonl, got {path!r}")


def _as_list(value, what: str, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v for v in value if v]
    raise ValueError(f"{where}: {what} must be a string or a list of strings, got {value!r}")


def _csv_rows(handle, path: str) -> list[ManifestEntry]:
    reader = csv.DictReader(handle)
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise ValueError(f"{path}: a CSV manifest needs a header with a 'path' column, got {reader.fieldnames}")
    entries = []
    for line, row in enumerate(reader, start=2):
        where = f"{path} line {line}"
        if not (row.get("path") or "").strip():
            raise ValueError(f"{where}: empty 'path'")
        labels = [name.strip() for name in (row.get("labels") or "").split(LABEL_SEPARATOR) if name.strip()]
        entries.append(ManifestEntry(row["path"].strip(), labels, _as_list(row.get("caption") or None, "caption", where),
                                     (row.get("split") or "").strip()))
    return entries


def _jsonl_rows(handle, path: str) -> list[ManifestEntry]:
    entries = []
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        where = f"{path} line {line}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
            raise ValueError(f"{where}: each line must be an object with a non-empty string 'path'")
        captions = _as_list(row.get("captions"), "captions", where) + _as_list(row.get("caption"), "caption", where)
        entries.append(ManifestEntry(row["path"], _as_list(row.get("labels"), "labels", where), captions,
                                     str(row.get("split") or "")))
    return entries


def read_manifest(path, root: str | None = None) -> list[ManifestEntry]:
    """Entries of a .csv or .jsonl manifest, with paths made absolute (against `root` or the file's folder)."""
    path = os.fspath(path)
    kind = _manifest_format(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    base = os.path.abspath(root if root is not None else os.path.dirname(path))
    try:
        # utf-8-sig: a manifest saved by Excel or Notepad starts with a byte-order mark, which is not part of "path"
        with open(path, newline="", encoding="utf-8-sig") as handle:
            entries = _csv_rows(handle, path) if kind == "csv" else _jsonl_rows(handle, path)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None
    except csv.Error as error:
        raise ValueError(f"{path}: not a readable CSV file ({error})") from None
    for number, entry in enumerate(entries, start=1):
        if "\0" in entry.path:
            raise ValueError(f"{path} line {number + (kind == 'csv')}: the path {entry.path!r} holds a NUL byte")
        entry.path = os.path.normpath(os.path.join(base, os.path.expanduser(entry.path)))
    return entries


def write_manifest(entries: list[ManifestEntry], path, relative: bool = True) -> str:
    """Write entries as .csv or .jsonl (by extension); paths relative to the manifest's folder if `relative`.

    CSV keeps one caption per row (the first); use JSONL for several captions per clip.
    """
    path = os.fspath(path)
    kind = _manifest_format(path)
    base = os.path.dirname(os.path.abspath(path))
    os.makedirs(base, exist_ok=True)

    def stored(entry_path):
        return os.path.relpath(entry_path, base) if relative and os.path.isabs(entry_path) else entry_path

    for entry in entries:
        bad = [name for name in entry.labels if LABEL_SEPARATOR in name]
        if kind == "csv" and bad:
            raise ValueError(f"labels containing '{LABEL_SEPARATOR}' cannot be stored in a CSV manifest: {bad}")
    temporary = path + ".tmp"
    with open(temporary, "w", newline="", encoding="utf-8") as handle:
        if kind == "csv":
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            for entry in entries:
                writer.writerow([stored(entry.path), LABEL_SEPARATOR.join(entry.labels),
                                 entry.captions[0] if entry.captions else "", entry.split])
        else:
            for entry in entries:
                row = entry.to_json()
                row["path"] = stored(entry.path)
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(temporary, path)
    return path


def check_files_exist(entries: list[ManifestEntry], show: int = 5) -> None:
    """Fail fast, before any training, when manifest rows point at files that are not there."""
    missing = [entry.path for entry in entries if not os.path.isfile(entry.path)]
    if missing:
        listed = "\n  ".join(missing[:show])
        more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
        raise FileNotFoundError(
            f"{len(missing)} of {len(entries)} audio files in the manifest are missing, e.g.:\n  {listed}{more}"
        )


def class_names_of(entries: list[ManifestEntry]) -> list[str]:
    """The sorted set of labels used anywhere in `entries`."""
    return sorted({name for entry in entries for name in entry.labels})


class UnreadableDataError(RuntimeError):
    """So many files of a data set cannot be read that it looks broken (each was reported on stderr)."""


class SkipCounter:
    """Counts skipped samples across DataLoader workers (a shared int with fork; per process with spawn)."""

    def __init__(self):
        self._shared = multiprocessing.get_context("fork").Value("l", 0) if sys.platform != "win32" else None
        self._local = 0

    def add(self):
        if self._shared is not None:
            with self._shared.get_lock():
                self._shared.value += 1
        else:
            self._local += 1

    @property
    def value(self) -> int:
        return self._shared.value if self._shared is not None else self._local

    def __getstate__(self):  # pickled for a spawned worker: counts there stay in that worker
        return {"_shared": None, "_local": self.value}


class SkippedRows:
    """Which rows of a manifest turned out unreadable: one flag per row, shared by DataLoader workers
    (with fork; per process with spawn), so each broken file is reported and counted once per run."""

    def __init__(self, size: int):
        self._flags = multiprocessing.get_context("fork").Array("b", max(size, 1)) if sys.platform != "win32" \
            else None
        self._local = np.zeros(max(size, 1), dtype=np.int8)

    def _array(self) -> np.ndarray:
        return np.frombuffer(self._flags.get_obj(), dtype=np.int8) if self._flags is not None else self._local

    def __contains__(self, index: int) -> bool:
        return bool(self._array()[index])

    def mark(self, index: int) -> bool:
        """Flag row `index`; True the first time it is flagged."""
        if self._flags is None:
            new = not self._local[index]
            self._local[index] = 1
            return new
        with self._flags.get_lock():
            flags = self._array()
            new = not flags[index]
            flags[index] = 1
        return new

    @property
    def count(self) -> int:
        return int(self._array().sum())

    def __getstate__(self):  # pickled for a spawned worker: flags set there stay in that worker
        return {"_flags": None, "_local": self._array().copy()}


def report_skip(error: AudioReadError, count: int, what: str = "audio") -> None:
    print(f"collat.data: skipping unreadable {what} {error.path}: {error.reason} ({count} skipped so far)",
          file=sys.stderr, flush=True)


def make_item(wave: torch.Tensor, entry_labels: list[str], captions: list[str], class_index: dict[str, int],
              text_source: str, shuffle: bool, rng: np.random.Generator, where: str) -> dict:
    """The item dict shared by every data set: wave, multi-hot labels, prompt or caption, names."""
    names = list(entry_labels)
    if shuffle and len(names) > 1:
        names = [names[k] for k in rng.permutation(len(names))]
    elif not shuffle:
        names = sorted(names, key=lambda name: class_index.get(name, len(class_index)))
    labels = torch.zeros(len(class_index), dtype=torch.float32)
    for name in names:
        labels[class_index[name]] = 1.0
    if text_source == "caption" and not captions:
        raise ValueError(f"{where}: text='caption' but the entry has no caption")
    if captions and text_source != "labels":
        text = captions[int(rng.integers(len(captions)))] if shuffle else captions[0]
    elif names:
        text = make_prompt(names)
    else:
        raise ValueError(f"{where}: the entry has neither labels nor a caption, so it has no text")
    return {"wave": wave, "labels": labels, "text": text, "names": names}


class ManifestDataset(torch.utils.data.Dataset):
    """Clips listed in a manifest, as item dicts like SoundfontDataset's.

    - `class_names` (default: every label in the whole manifest, sorted, so all splits share one
      index) defines the multi-hot `labels`; a label outside it is an error.
    - `text`: "auto" uses a caption when the row has one, else the prompt built from its labels.
    - mode="train" (default for split "train"): random crop and shuffled label order / a random
      caption, all drawn from `np.random.default_rng([seed, index, epoch])` (call `set_epoch`), so a
      resumed run reads the same data. mode="eval": a fixed crop (see audio_io) and fixed order.
    - Missing files fail fast at construction (`check_files=True`), listing the first few.
    - A file that cannot be decoded when read is reported on stderr with its path, counted in
      `skipped` (distinct files, across DataLoader workers and epochs), and replaced by the next
      readable row of the data set (never by zeros); call `summary()` at the end of a run for the
      count. `load(index)` reads one row without substitution (for evaluation that must not
      duplicate rows).
    """

    def __init__(self, manifest, split: str | None = None, class_names: list[str] | None = None,
                 sample_rate: int = 16000, clip_seconds: float | None = 10.0, mode: str | None = None, seed: int = 0,
                 root: str | None = None, text: str = "auto", crop: str = "start", check_files: bool = True,
                 max_consecutive_skips: int = 50):
        if text not in TEXT_SOURCES:
            raise ValueError(f"text must be one of {TEXT_SOURCES}, got {text!r}")
        all_entries = read_manifest(manifest, root) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
        if not all(isinstance(entry, ManifestEntry) for entry in all_entries):
            raise TypeError("manifest must be a path or a list of ManifestEntry")
        self.class_names = list(class_names) if class_names is not None else class_names_of(all_entries)
        self.class_index = {name: k for k, name in enumerate(self.class_names)}
        self.entries = [entry for entry in all_entries if split is None or entry.split == split]
        if split is not None and not self.entries:
            splits = sorted({entry.split for entry in all_entries})
            raise ValueError(f"split {split!r} has no rows in the manifest; its splits are {splits}")
        unknown = sorted({name for entry in self.entries for name in entry.labels} - set(self.class_index))
        if unknown:
            raise ValueError(f"labels not in class_names: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
        for entry in self.entries:
            if (text == "labels" and not entry.labels) or (text == "caption" and not entry.captions) or (
                    not entry.labels and not entry.captions):
                raise ValueError(f"manifest row {entry.path} has no {'caption' if text == 'caption' else 'labels'}"
                                 f"{'' if text != 'auto' else ' and no caption'}, so it has no text (text={text!r})")
        if check_files:
            check_files_exist(self.entries)
        self.split = split
        self.mode = mode if mode is not None else ("train" if split == "train" else "eval")
        if self.mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.sample_rate = sample_rate
        self.clip_seconds = clip_seconds
        self.seed = seed
        self.text = text
        self.crop = crop
        self.epoch = 0
        self.max_consecutive_skips = max_consecutive_skips
        self._skipped_rows = SkippedRows(len(self.entries))

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def skipped(self) -> int:
        return self._skipped_rows.count

    def summary(self) -> str:
        line = f"collat.data: {self.skipped} unreadable audio file(s) skipped out of {len(self)} in the manifest"
        print(line, file=sys.stderr if self.skipped else sys.stdout, flush=True)
        return line

    def load(self, index: int) -> dict:
        """Item `index`; raises AudioReadError when its file cannot be read (no substitution)."""
        entry = self.entries[index]
        rng = np.random.default_rng([self.seed, index, self.epoch])
        wave = load_audio(entry.path, self.sample_rate, self.clip_seconds, self.mode, rng, self.crop)
        return make_item(wave, entry.labels, entry.captions, self.class_index, self.text, self.mode == "train", rng,
                         entry.path)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries")
        index %= len(self)
        for attempt in range(min(self.max_consecutive_skips, len(self))):
            row = (index + attempt) % len(self)
            if row in self._skipped_rows:
                continue
            try:
                return self.load(row)
            except AudioReadError as error:
                if self._skipped_rows.mark(row):
                    report_skip(error, self.skipped)
        tried = min(self.max_consecutive_skips, len(self))
        if tried == len(self):
            raise UnreadableDataError(f"none of the {len(self)} audio files of the data set can be read ({self.skipped} "
                               "skipped, each reported above); the data looks broken")
        raise UnreadableDataError(f"{tried} audio files in a row could not be read, starting at "
                           f"{self.entries[index].path} ({self.skipped} of {len(self)} skipped so far); the data looks "
                           "broken")
