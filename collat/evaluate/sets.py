"""The clips an evaluation runs on: the embedded soundfont test sets and the rows of manifests.

Embedded sets (test split, clips as long as the model's clip_seconds):
  soundfont/seen-single    1 source, the 30 seen classes           accuracy, probe
  soundfont/heldout-single 1 source, the 6 held-out classes        accuracy (6-way)
  soundfont/seen-mixture   2-3 sources, the 30 seen classes        mAP, probe, retrieval
  soundfont/seen-single-other-recordings   (with other_soundfont) 1 source, the 30 seen classes rendered
                           from another General MIDI soundfont: recordings never heard in training
The mixtures use every ordering of their class names as the clip's captions (the template is
order-agnostic), so a clip has 2 or 6 relevant captions. Manifests: rows of one split (all rows when
the manifest has no split column); labelled rows give classification, captioned rows retrieval.
Cross-validation (`fold_sets`): each split of a manifest in turn is the test set and the others train
the probes (ESC-50's 5 folds, UrbanSound8K's 10).
"""
from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from collat.data.audio_io import AudioReadError
from collat.prompts import make_prompt


@dataclass
class ClipSet:
    """Clips to evaluate: waves plus labels (multi-hot over class_names) and/or captions per clip."""

    name: str
    waves: list[torch.Tensor]
    labels: torch.Tensor | None = None
    class_names: list[str] | None = None
    captions: list[list[str]] | None = None
    train: "ClipSet | None" = None  # the probes' training clips (same class_names)
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def multi_label(self) -> bool:
        return self.labels is not None and bool((self.labels.sum(1) != 1).any())


def soundfont_set(name, split, size, classes, sources, seed, clip_seconds, captions=False,
                  soundfont: str | None = None) -> ClipSet:
    from collat.data.soundfont import SoundfontDataset

    data = SoundfontDataset(split, size=size, seed=seed, classes=classes, sources=sources, clip_seconds=clip_seconds,
                            shuffle_labels=False, soundfont=soundfont)
    items = [data[i] for i in progress(range(len(data)), f"rendering {name}")]
    clip_captions = None
    if captions:
        clip_captions = [[make_prompt(list(order)) for order in itertools.permutations(item["names"])] for item in items]
    return ClipSet(name, [item["wave"] for item in items], torch.stack([item["labels"] for item in items]),
                   list(data.class_names), clip_captions)


def embedded_sets(clip_seconds: float, test_size: int = 200, train_size: int = 400, seed: int = 0,
                  probe: bool = True, other_soundfont: str | None = None) -> list[ClipSet]:
    """The embedded soundfont evaluation sets of the module docstring (test split; probes on train);
    other_soundfont (a .sf2 path) adds the seen classes rendered from that soundfont's recordings."""
    from collat.data.gm_sounds import HELDOUT_CLASSES, SEEN_CLASSES

    if test_size < 1:
        raise ValueError(f"test_size must be >= 1, got {test_size}")
    sets = []
    for name, classes, sources, captions in (
        ("soundfont/seen-single", SEEN_CLASSES, (1, 1), False),
        ("soundfont/heldout-single", HELDOUT_CLASSES, (1, 1), False),
        ("soundfont/seen-mixture", SEEN_CLASSES, (2, 3), True),
    ):
        size = test_size if classes is SEEN_CLASSES else max(test_size // 2, 1)
        clip_set = soundfont_set(name, "test", size, classes, sources, seed, clip_seconds, captions)
        if classes is not SEEN_CLASSES:
            clip_set.notes.append("zero-shot only: these classes are never trained on, probes would defeat the point")
        elif probe and train_size > 0:
            clip_set.train = soundfont_set(name + "/train", "train", train_size, classes, sources, seed, clip_seconds)
        sets.append(clip_set)
    if other_soundfont:
        clip_set = soundfont_set("soundfont/seen-single-other-recordings", "test", test_size, SEEN_CLASSES, (1, 1),
                                 seed, clip_seconds, soundfont=other_soundfont)
        clip_set.notes.append(f"zero-shot only: the seen classes played by {os.path.basename(other_soundfont)}")
        sets.append(clip_set)
    return sets


def progress(iterable, description: str):
    """A tqdm bar on stderr when it is a terminal (none in logs and tests)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=description, disable=None, leave=False, dynamic_ncols=True)


def load_manifest_rows(dataset, label: str) -> tuple[list[torch.Tensor], list[int], int]:
    waves, kept, skipped = [], [], 0
    for index in progress(range(len(dataset)), f"reading {label}"):
        try:
            waves.append(dataset.load(index)["wave"])
            kept.append(index)
        except AudioReadError as error:
            skipped += 1
            print(f"collat.evaluate: skipping unreadable audio {error.path}: {error.reason}", file=sys.stderr)
    if skipped:
        print(f"collat.evaluate: {label}: skipped {skipped} of {len(dataset)} unreadable file(s)", file=sys.stderr)
    if not waves:
        raise ValueError(f"{label}: none of the {len(dataset)} audio files could be read")
    return waves, kept, skipped


def _entries(source, root: str | None) -> tuple[list, str]:
    """(manifest rows, a name for the sets) from a manifest path or a list of ManifestEntry."""
    from collat.data.manifest import read_manifest

    if isinstance(source, (str, os.PathLike)):
        entries, name = read_manifest(source, root), f"manifest/{Path(source).stem}"
        if not entries:
            raise ValueError(f"manifest {source} has no rows")
        return entries, name
    if not source:
        raise ValueError("the manifest has no rows")
    return list(source), "manifest"


def _read_set(rows: list, class_names: list[str], clip_seconds: float, label: str) -> tuple[ClipSet, list]:
    """The ClipSet of manifest rows (unreadable files reported and left out), and the rows it kept."""
    from collat.data.manifest import ManifestDataset

    dataset = ManifestDataset(rows, class_names=class_names, clip_seconds=clip_seconds, mode="eval", check_files=True)
    waves, kept, skipped = load_manifest_rows(dataset, label)
    rows = [dataset.entries[i] for i in kept]
    labels = captions = None
    if class_names and all(row.labels for row in rows):
        labels = torch.zeros(len(rows), len(class_names))
        for r, row in enumerate(rows):
            labels[r, [class_names.index(n) for n in row.labels]] = 1.0
    if all(row.captions for row in rows):
        captions = [list(row.captions) for row in rows]
    clip_set = ClipSet(label, waves, labels, class_names if labels is not None else None, captions, skipped=skipped)
    if labels is None and captions is None:
        clip_set.notes.append("rows mix labelled and unlabelled (or captioned and uncaptioned) clips: "
                              "classification and retrieval need every row to have labels / captions")
    return clip_set, rows


def manifest_sets(path, clip_seconds: float, split: str = "test", train_split: str | None = "train",
                  root: str | None = None, max_clips: int | None = None, labelled_only: bool = False) -> list[ClipSet]:
    """One ClipSet for the manifest's `split` (all rows if the manifest has no splits), with its
    `train_split` rows as probe training data when there are labelled ones. `path` may also be a list
    of ManifestEntry. `labelled_only` keeps the rows that have labels; `max_clips` keeps the first rows
    of each set."""
    from collat.data.manifest import class_names_of

    entries, name = _entries(path, root)
    splits = sorted({entry.split for entry in entries})
    if splits == [""]:
        chosen, train_split = None, None
    elif split in splits:
        chosen = split
    else:
        raise ValueError(f"manifest {name} has no rows in split {split!r}; its splits are {splits} (use --split)")
    class_names = class_names_of(entries)
    name += f"/{chosen}" if chosen else ""

    def build(rows_split, label):
        rows = [entry for entry in entries if rows_split is None or entry.split == rows_split]
        rows = [entry for entry in rows if entry.labels or not labelled_only][:max_clips]
        return _read_set(rows, class_names, clip_seconds, label)[0]

    test = build(chosen, name)
    if train_split and train_split in splits and test.labels is not None:
        train = build(train_split, f"{name}:{train_split}")
        if train.labels is not None:
            test.train = train
    return [test]


def fold_sets(path, clip_seconds: float, root: str | None = None, name: str | None = None) -> list[ClipSet]:
    """Cross-validation: one ClipSet per split ("fold") of a labelled manifest, named NAME/FOLD, whose
    probes train on the rows of every other fold. Each file is read once, whatever the number of folds."""
    from collat.data.manifest import class_names_of

    entries, default_name = _entries(path, root)
    name = name or default_name
    folds = sorted({entry.split for entry in entries})
    if len(folds) < 2 or "" in folds:
        raise ValueError(f"cross-validation (--folds) needs every manifest row in a split (its fold) and at least 2 "
                         f"folds; the splits are {folds}")
    if not all(entry.labels for entry in entries):
        raise ValueError("cross-validation (--folds) needs labels on every manifest row")
    everything, kept = _read_set(entries, class_names_of(entries), clip_seconds, f"{name} (all folds)")
    sets = []
    for fold in folds:
        inside = [k for k, entry in enumerate(kept) if entry.split == fold]
        outside = [k for k, entry in enumerate(kept) if entry.split != fold]
        if not inside:
            raise ValueError(f"fold {fold!r}: none of its audio files could be read")
        test = _subset(everything, inside, f"{name}/{fold}")
        test.train = _subset(everything, outside, f"{name}/{fold}:train")
        test.skipped = sum(1 for entry in entries if entry.split == fold) - len(inside)
        sets.append(test)
    return sets


def _subset(clip_set: ClipSet, indices: list[int], label: str) -> ClipSet:
    return ClipSet(label, [clip_set.waves[k] for k in indices], clip_set.labels[indices], clip_set.class_names)
