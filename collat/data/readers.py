"""Manifests from the standard on-disk layouts of ESC-50, UrbanSound8K, FSD50K and AudioSet.

Each reader takes the data set's root folder, as unpacked from its official archive, and returns
ManifestEntry rows with absolute paths. Class names are made plain words for prompts: underscores
become spaces ("chirping_birds" -> "chirping birds", "Electric_guitar" -> "Electric guitar"); case is
kept. Command line:

    python -m collat.data.readers esc50 /data/ESC-50-master esc50.csv
    python -m collat.data.readers audioset /data/audioset audioset.jsonl --clips /data/audioset/clips

Layouts (the files each reader opens):
- ESC-50: `meta/esc50.csv` (filename,fold,target,category,esc10,src_file,take), `audio/{filename}`;
  5 folds, mapped to splits by `fold_splits` (default 1-3 train, 4 val, 5 test).
- UrbanSound8K: `metadata/UrbanSound8K.csv` (slice_file_name,fsID,start,end,salience,fold,classID,
  class), `audio/fold{fold}/{slice_file_name}`; 10 folds (default 1-8 train, 9 val, 10 test).
- FSD50K: `FSD50K.ground_truth/dev.csv` (fname,labels,mids,split with split train/val) and
  `FSD50K.ground_truth/eval.csv` (fname,labels,mids), labels comma-separated in one field;
  audio `FSD50K.dev_audio/{fname}.wav` and `FSD50K.eval_audio/{fname}.wav`. eval -> "test".
- AudioSet: segment CSVs (`balanced_train_segments.csv`, `unbalanced_train_segments.csv`,
  `eval_segments.csv`: three `# ` header lines, then `YTID, start_seconds, end_seconds,
  "mid1,mid2"`), `class_labels_indices.csv` (index,mid,display_name), and a folder of clips
  (searched recursively). A clip is found under any of these names, with extension .wav, .flac,
  .ogg or .mp3, where START/END are the segment times written as in the CSV ("30.000"), with one
  decimal ("30.0") or as whole seconds ("30"):
      {YTID}   Y{YTID}   {YTID}_{START}   Y{YTID}_{START}   {YTID}_{START}_{END}   Y{YTID}_{START}_{END}
  Segments without a clip are left out and counted (many AudioSet videos are no longer online).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

from collat.data.manifest import ManifestEntry, write_manifest

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
ESC50_FOLD_SPLITS = {1: "train", 2: "train", 3: "train", 4: "val", 5: "test"}
URBANSOUND8K_FOLD_SPLITS = {**{fold: "train" for fold in range(1, 9)}, 9: "val", 10: "test"}
AUDIOSET_SEGMENT_SPLITS = {"balanced_train_segments.csv": "train", "unbalanced_train_segments.csv": "train",
                           "eval_segments.csv": "test"}


def plain_name(label: str) -> str:
    return label.replace("_", " ").strip()


def _require(path: str, dataset: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{dataset}: expected the file {path}; "
                                f"is the root folder the unpacked {dataset} archive?")
    return path


def _read_csv(path: str, required: list[str], dataset: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{dataset}: {path} lacks the column(s) {missing}; its header is {reader.fieldnames}")
        return list(reader)


def esc50_entries(root, fold_splits: dict[int, str] | None = None) -> list[ManifestEntry]:
    """ESC-50: one label per clip; folds not in `fold_splits` are left out (e.g. for one CV round)."""
    root = os.path.abspath(root)
    fold_splits = ESC50_FOLD_SPLITS if fold_splits is None else fold_splits
    rows = _read_csv(_require(os.path.join(root, "meta", "esc50.csv"), "ESC-50"),
                     ["filename", "fold", "category"], "ESC-50")
    entries = []
    for row in rows:
        split = fold_splits.get(int(row["fold"]))
        if split is not None:
            entries.append(ManifestEntry(os.path.join(root, "audio", row["filename"]), [plain_name(row["category"])],
                                         [], split))
    return entries


def urbansound8k_entries(root, fold_splits: dict[int, str] | None = None) -> list[ManifestEntry]:
    """UrbanSound8K: one label per slice, audio in audio/fold{N}/."""
    root = os.path.abspath(root)
    fold_splits = URBANSOUND8K_FOLD_SPLITS if fold_splits is None else fold_splits
    rows = _read_csv(_require(os.path.join(root, "metadata", "UrbanSound8K.csv"), "UrbanSound8K"),
                     ["slice_file_name", "fold", "class"], "UrbanSound8K")
    entries = []
    for row in rows:
        fold = int(row["fold"])
        split = fold_splits.get(fold)
        if split is not None:
            path = os.path.join(root, "audio", f"fold{fold}", row["slice_file_name"])
            entries.append(ManifestEntry(path, [plain_name(row["class"])], [], split))
    return entries


def fsd50k_entries(root, eval_split: str = "test") -> list[ManifestEntry]:
    """FSD50K: multi-label; dev rows keep their train/val split, eval rows get `eval_split`."""
    root = os.path.abspath(root)
    truth = os.path.join(root, "FSD50K.ground_truth")
    entries = []
    for csv_name, audio_dir, default_split in (("dev.csv", "FSD50K.dev_audio", "train"),
                                               ("eval.csv", "FSD50K.eval_audio", eval_split)):
        rows = _read_csv(_require(os.path.join(truth, csv_name), "FSD50K"), ["fname", "labels"], "FSD50K")
        for row in rows:
            labels = [plain_name(label) for label in row["labels"].split(",") if label.strip()]
            split = (row.get("split") or "").strip() or default_split
            entries.append(ManifestEntry(os.path.join(root, audio_dir, f"{row['fname']}.wav"), labels, [], split))
    return entries


def read_audioset_labels(path: str) -> dict[str, str]:
    """mid -> display name, from class_labels_indices.csv (index,mid,display_name)."""
    rows = _read_csv(_require(path, "AudioSet"), ["mid", "display_name"], "AudioSet")
    return {row["mid"]: row["display_name"].strip() for row in rows}


def read_audioset_segments(path: str) -> list[tuple[str, str, str, list[str]]]:
    """(YTID, start text, end text, [mids]) per row of a segment CSV; `#` lines are comments."""
    segments = []
    with open(_require(path, "AudioSet"), newline="", encoding="utf-8-sig") as handle:
        lines = (line for line in handle if line.strip() and not line.lstrip().startswith("#"))
        for number, row in enumerate(csv.reader(lines, skipinitialspace=True), start=1):
            if len(row) < 4:
                raise ValueError(f"AudioSet: {path} data row {number} has {len(row)} fields, expected "
                                 f"YTID, start_seconds, end_seconds, positive_labels: {row}")
            mids = [mid.strip() for mid in row[3].split(",") if mid.strip()]
            segments.append((row[0].strip(), row[1].strip(), row[2].strip(), mids))
    return segments


def _time_spellings(text: str) -> list[str]:
    seconds = float(text)
    return list(dict.fromkeys([text, f"{seconds:.3f}", f"{seconds:.1f}", f"{seconds:g}", str(int(seconds))]))


def audioset_clip_names(ytid: str, start: str, end: str) -> list[str]:
    """The file stems (no extension) under which the clip of a segment is looked up."""
    names = [ytid]
    for start_text in _time_spellings(start):
        names.append(f"{ytid}_{start_text}")
        for end_text in _time_spellings(end):
            names.append(f"{ytid}_{start_text}_{end_text}")
    return names + ["Y" + name for name in names]


def _index_clips(folder: str) -> dict[str, str]:
    stems = {}
    for directory, _, files in os.walk(folder):
        for name in files:
            stem, extension = os.path.splitext(name)
            if extension.lower() in AUDIO_EXTENSIONS:
                stems.setdefault(stem, os.path.join(directory, name))
    return stems


def audioset_entries(root, clips_dir: str | None = None, segment_splits: dict[str, str] | None = None,
                     labels_csv: str | None = None, verbose: bool = True) -> list[ManifestEntry]:
    """AudioSet segments that have a clip in `clips_dir` (default: root), labelled with display names.

    `segment_splits` maps segment CSV file names (in root) to splits; files that are absent are
    skipped, unless none is present, which is an error.
    """
    root = os.path.abspath(root)
    clips_dir = os.path.abspath(clips_dir) if clips_dir is not None else root
    segment_splits = AUDIOSET_SEGMENT_SPLITS if segment_splits is None else segment_splits
    names = read_audioset_labels(labels_csv or os.path.join(root, "class_labels_indices.csv"))
    present = {name: split for name, split in segment_splits.items() if os.path.isfile(os.path.join(root, name))}
    if not present:
        raise FileNotFoundError(f"AudioSet: none of the segment CSVs {list(segment_splits)} is in {root}")
    if not os.path.isdir(clips_dir):
        raise FileNotFoundError(f"AudioSet: the clips folder {clips_dir} does not exist")
    clips = _index_clips(clips_dir)
    entries, seen = [], set()
    for csv_name, split in present.items():
        segments = read_audioset_segments(os.path.join(root, csv_name))
        found = 0
        for ytid, start, end, mids in segments:
            unknown = [mid for mid in mids if mid not in names]
            if unknown:
                raise ValueError(f"AudioSet: {csv_name} segment {ytid} has label ids {unknown} that "
                                 f"class_labels_indices.csv does not list")
            path = next((clips[stem] for stem in audioset_clip_names(ytid, start, end) if stem in clips), None)
            if path is None or (path, split) in seen:
                continue
            seen.add((path, split))
            found += 1
            entries.append(ManifestEntry(path, [names[mid] for mid in mids], [], split))
        if verbose:
            print(f"AudioSet: {csv_name}: {found} of {len(segments)} segments have a clip in {clips_dir} "
                  f"({len(segments) - found} left out)", file=sys.stderr)
    return entries


FOLDED = {"esc50": ESC50_FOLD_SPLITS, "urbansound8k": URBANSOUND8K_FOLD_SPLITS}  # the folds each data set has
READERS = {"esc50": esc50_entries, "urbansound8k": urbansound8k_entries, "fsd50k": fsd50k_entries,
           "audioset": audioset_entries}


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a collat manifest from a data set's on-disk layout.")
    parser.add_argument("dataset", choices=sorted(READERS))
    parser.add_argument("root", help="the data set's root folder")
    parser.add_argument("output", help="manifest to write (.csv or .jsonl)")
    parser.add_argument("--clips", help="AudioSet: the folder of clips (default: root)")
    parser.add_argument("--absolute", action="store_true", help="store absolute paths (default: relative)")
    parser.add_argument("--folds", action="store_true", help="esc50 / urbansound8k: one split per fold (fold1, "
                                                             "fold2, ...) for cross-validation (collat.evaluate --folds)")
    args = parser.parse_args(argv)
    if args.folds and args.dataset not in FOLDED:
        parser.error(f"--folds applies to {' and '.join(FOLDED)} only")
    if args.dataset == "audioset":
        entries = audioset_entries(args.root, clips_dir=args.clips)
    else:
        if args.clips:
            parser.error("--clips applies to audioset only")
        folds = {fold: f"fold{fold}" for fold in FOLDED[args.dataset]} if args.folds else None
        entries = READERS[args.dataset](args.root, folds) if folds else READERS[args.dataset](args.root)
    write_manifest(entries, args.output, relative=not args.absolute)
    splits = {}
    for entry in entries:
        splits[entry.split] = splits.get(entry.split, 0) + 1
    print(f"wrote {len(entries)} rows to {args.output}: {splits}")


if __name__ == "__main__":
    main()
