"""`python -m collat.evaluate --model DIR`: zero-shot classification, linear probes, retrieval and
robustness to noise of a trained CoLLAT, on the embedded soundfont data and on manifests.

Tasks (paper Tables 2 and 3; metric definitions in collat.metrics):
- zero-shot: cosine between the clip embedding z_a and the prompt "This is a sound of {label}" of
  every class. Single-label sets report top-1 / top-5 accuracy, multi-label sets macro mAP.
- probe (frozen model features): "decoder" = a 1-layer transformer decoder head (the paper's linear
  probe) whose one learned query cross-attends to conditioning(audio) [B, N, W]; "logreg" = sklearn
  logistic regression on z_a (one-vs-rest for multi-label). Trained on the train split, scored on test.
- retrieval audio->text and text->audio: R@1/5/10, MRR, mAP@10 (LAION-CLAP / WavCaps), on sets with
  captions. The embedded mixtures use every ordering of their class names as the clip's captions
  (the template is order-agnostic), so a clip has 2 or 6 relevant captions.
- noisy: the zero-shot and retrieval numbers again with Gaussian noise (std 0.1, seeded, identical
  for every model) added either to the waveform (default; what "noisy audio" means to a user) or to
  the normalised fbank (the domain of L_ut's training noise). Both are reported by default.

Embedded sets (test split, clips as long as the model's clip_seconds):
  soundfont/seen-single   1 source, the 30 seen classes          accuracy, probe
  soundfont/heldout-single 1 source, the 6 held-out classes      accuracy (6-way)
  soundfont/seen-mixture  2-3 sources, the 30 seen classes        mAP, probe, retrieval
Manifests: rows of the --split split (all rows when the manifest has no split column); labelled rows
give classification (single-label when every row has one label), captioned rows retrieval; a
--train-split split, when present, trains the probes.

Results: a markdown table on stdout and JSON written atomically to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from collat import metrics
from collat.fileio import atomic_write_text

NOISE_DOMAINS = ("waveform", "fbank")
PROBES = ("decoder", "logreg")
TASKS = ("zero-shot", "probe", "retrieval", "noisy")
EXIT_ERROR = 1


# ----------------------------------------------------------------------------------------------
# Model loading and feature extraction
# ----------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def load_model(directory: str | os.PathLike, device: str | torch.device = "cpu"):
    """CoLLAT.from_pretrained with a clear error for a missing path or a run folder without weights."""
    from collat.model import CONFIG_NAME, CoLLAT

    directory = os.fspath(directory)
    if not os.path.exists(directory):
        raise FileNotFoundError(f"model checkpoint not found: {directory}")
    if not os.path.isdir(directory):
        raise ValueError(f"--model must be a checkpoint directory (config.json + model.safetensors), got the file {directory}")
    # A training run folder keeps its weights in DIR/checkpoint/.
    nested = os.path.join(directory, "checkpoint")
    if not os.path.isfile(os.path.join(directory, CONFIG_NAME)) and os.path.isfile(os.path.join(nested, CONFIG_NAME)):
        directory = nested
    model = CoLLAT.from_pretrained(directory)
    return model.to(torch.device(device) if isinstance(device, str) else device).eval()


@dataclass
class Noise:
    """Seeded Gaussian noise of `std` on the waveform or on the normalised fbank."""

    domain: str
    std: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if self.domain not in NOISE_DOMAINS:
            raise ValueError(f"noise domain must be one of {NOISE_DOMAINS}, got {self.domain!r}")
        if self.std < 0:
            raise ValueError(f"noise std must be >= 0, got {self.std}")

    @property
    def name(self) -> str:
        return f"noisy-{self.domain}"


def extract_features(model, waves: list[torch.Tensor], batch_size: int = 32, noise: Noise | None = None,
                     conditioning: bool = False) -> dict[str, torch.Tensor]:
    """One audio pass per clip: {"embedding": z_a [B, E] (L2-normalised), "conditioning": [B, N, W]}.

    Equal to model.encode_audio / model.conditioning (tested), but the audio encoder runs once for both.
    """
    if noise is not None and noise.domain == "waveform":
        waves = metrics.add_waveform_noise(waves, noise.std, noise.seed)
    fbank_std = noise.std if noise is not None and noise.domain == "fbank" else 0.0
    seed = noise.seed if noise is not None else 0
    h_at = model.audio_to_text_tokens(waves, batch_size=batch_size, noise_std=fbank_std, noise_seed=seed)
    embeddings, hidden = [], []
    with torch.no_grad():
        for start in range(0, h_at.shape[0], batch_size):
            chunk = h_at[start : start + batch_size].to(model.device)
            embeddings.append(F.normalize(model.text.encode_predicted(chunk).float(), dim=-1).cpu())
            if conditioning:
                hidden.append(model.text.hidden_predicted(chunk).float().cpu())
    out = {"embedding": torch.cat(embeddings)}
    if conditioning:
        out["conditioning"] = torch.cat(hidden)
    return out


def class_prompt_embeddings(model, class_names: list[str]) -> torch.Tensor:
    """z_t of "This is a sound of {label}" for every class, as model.zero_shot builds them."""
    from collat.model import make_prompt

    return model.encode_text([make_prompt([name]) for name in class_names]).cpu()


# ----------------------------------------------------------------------------------------------
# Evaluation sets
# ----------------------------------------------------------------------------------------------


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


def _soundfont_set(name, split, size, classes, sources, seed, clip_seconds, captions=False) -> ClipSet:
    from collat.data.soundfont import SoundfontDataset, make_prompt

    data = SoundfontDataset(split, size=size, seed=seed, classes=classes, sources=sources, clip_seconds=clip_seconds,
                            shuffle_labels=False)
    items = [data[i] for i in range(len(data))]
    clip_captions = None
    if captions:
        clip_captions = [[make_prompt(list(order)) for order in itertools.permutations(item["names"])] for item in items]
    return ClipSet(name, [item["wave"] for item in items], torch.stack([item["labels"] for item in items]),
                   list(data.class_names), clip_captions)


def embedded_sets(clip_seconds: float, test_size: int = 200, train_size: int = 400, seed: int = 0,
                  probe: bool = True) -> list[ClipSet]:
    """The embedded soundfont evaluation sets of the module docstring (test split; probes on train)."""
    from collat.data.soundfont import HELDOUT_CLASSES, SEEN_CLASSES

    if test_size < 1:
        raise ValueError(f"test_size must be >= 1, got {test_size}")
    sets = []
    for name, classes, sources, captions in (
        ("soundfont/seen-single", SEEN_CLASSES, (1, 1), False),
        ("soundfont/heldout-single", HELDOUT_CLASSES, (1, 1), False),
        ("soundfont/seen-mixture", SEEN_CLASSES, (2, 3), True),
    ):
        size = test_size if classes is SEEN_CLASSES else max(test_size // 2, 1)
        clip_set = _soundfont_set(name, "test", size, classes, sources, seed, clip_seconds, captions)
        if classes is not SEEN_CLASSES:
            clip_set.notes.append("zero-shot only: these classes are never trained on, probes would defeat the point")
        elif probe and train_size > 0:
            clip_set.train = _soundfont_set(name + "/train", "train", train_size, classes, sources, seed, clip_seconds)
        sets.append(clip_set)
    return sets


def _load_manifest_rows(dataset, label: str) -> tuple[list[torch.Tensor], list[int], int]:
    from collat.data.audio_io import AudioReadError

    waves, kept, skipped = [], [], 0
    for index in range(len(dataset)):
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


def manifest_sets(path: str, clip_seconds: float, split: str = "test", train_split: str | None = "train",
                  root: str | None = None) -> list[ClipSet]:
    """One ClipSet for the manifest's `split` (all rows if the manifest has no splits), with its
    `train_split` rows as probe training data when there are labelled ones."""
    from collat.data.manifest import ManifestDataset, class_names_of, read_manifest

    entries = read_manifest(path, root)
    if not entries:
        raise ValueError(f"manifest {path} has no rows")
    splits = sorted({entry.split for entry in entries})
    if splits == [""]:
        chosen, train_split = None, None
    elif split in splits:
        chosen = split
    else:
        raise ValueError(f"manifest {path} has no rows in split {split!r}; its splits are {splits} (use --split)")
    class_names = class_names_of(entries)
    name = f"manifest/{Path(path).stem}" + (f"/{chosen}" if chosen else "")

    def build(rows_split, label):
        dataset = ManifestDataset(entries, split=rows_split, class_names=class_names, clip_seconds=clip_seconds,
                                  mode="eval", check_files=True)
        waves, kept, skipped = _load_manifest_rows(dataset, label)
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
        return clip_set

    test = build(chosen, name)
    if train_split and train_split in splits and test.labels is not None:
        train = build(train_split, f"{name}:{train_split}")
        if train.labels is not None:
            test.train = train
    return [test]


# ----------------------------------------------------------------------------------------------
# Probes
# ----------------------------------------------------------------------------------------------


class ProbeDecoder(nn.Module):
    """The paper's linear-probe head: a 1-layer transformer decoder whose single learned query
    cross-attends to the frozen model's token features, then a linear classifier."""

    def __init__(self, memory_dim: int, memory_len: int, num_classes: int, dim: int = 128, num_heads: int = 4,
                 ff_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.memory_norm = nn.LayerNorm(memory_dim)
        self.memory_proj = nn.Linear(memory_dim, dim)
        self.memory_position = nn.Parameter(torch.randn(memory_len, dim) * 0.02)
        self.layer = nn.TransformerDecoderLayer(dim, num_heads, ff_dim, dropout, batch_first=True, norm_first=True)
        self.norm_out = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        memory = self.memory_proj(self.memory_norm(memory)) + self.memory_position
        x = self.layer(self.query.expand(memory.shape[0], -1, -1), memory)
        return self.classifier(self.norm_out(x[:, 0]))


@dataclass
class ProbeTraining:
    epochs: int = 60
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


def decoder_probe(train_memory: torch.Tensor, train_labels: torch.Tensor, test_memory: torch.Tensor,
                  multi_label: bool, training: ProbeTraining = ProbeTraining()) -> torch.Tensor:
    """Train a ProbeDecoder (cross-entropy, or BCE for multi-label); return test scores [B, C].
    Seeded by training.seed without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        return _train_decoder_probe(train_memory, train_labels, test_memory, multi_label, training)


def _train_decoder_probe(train_memory, train_labels, test_memory, multi_label, training):
    _, memory_len, memory_dim = train_memory.shape
    head = ProbeDecoder(memory_dim, memory_len, train_labels.shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    generator = torch.Generator().manual_seed(training.seed)
    targets = train_labels.float() if multi_label else train_labels.argmax(1)
    head.train()
    for _ in range(training.epochs):
        order = torch.randperm(train_memory.shape[0], generator=generator)
        for start in range(0, len(order), training.batch_size):
            index = order[start : start + training.batch_size]
            logits = head(train_memory[index])
            if multi_label:
                loss = F.binary_cross_entropy_with_logits(logits, targets[index])
            else:
                loss = F.cross_entropy(logits, targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.eval()
    with torch.no_grad():
        logits = torch.cat([head(test_memory[s : s + 256]) for s in range(0, test_memory.shape[0], 256)])
    return logits.sigmoid() if multi_label else logits.softmax(-1)


def logistic_probe(train_x: torch.Tensor, train_labels: torch.Tensor, test_x: torch.Tensor, multi_label: bool,
                   C: float = 1.0, seed: int = 0) -> torch.Tensor:
    """sklearn LogisticRegression on z_a; one binary model per class for multi-label. A class seen
    with only one value in training gets that training frequency as its constant score."""
    from sklearn.linear_model import LogisticRegression

    x_train, x_test = train_x.numpy().astype(np.float64), test_x.numpy().astype(np.float64)
    y = train_labels.numpy()
    scores = np.zeros((x_test.shape[0], y.shape[1]))
    if multi_label:
        for c in range(y.shape[1]):
            if y[:, c].min() == y[:, c].max():
                scores[:, c] = y[:, c].mean()
                continue
            model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_train, y[:, c])
            scores[:, c] = model.predict_proba(x_test)[:, 1]
    else:
        target = y.argmax(1)
        if len(np.unique(target)) < 2:
            raise ValueError("the logistic-regression probe needs at least two classes in its training clips")
        model = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(x_train, target)
        scores[:, model.classes_] = model.predict_proba(x_test)
    return torch.from_numpy(scores)


# ----------------------------------------------------------------------------------------------
# Running the evaluation
# ----------------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    tasks: tuple[str, ...] = TASKS
    probes: tuple[str, ...] = ("decoder",)
    noise_domains: tuple[str, ...] = NOISE_DOMAINS
    noise_std: float = 0.1
    noise_seed: int = 0
    batch_size: int = 32
    probe_training: ProbeTraining = field(default_factory=ProbeTraining)

    def validate(self):
        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
        for probe in self.probes:
            if probe not in PROBES:
                raise ValueError(f"unknown probe {probe!r}; probes are {PROBES}")
        for domain in self.noise_domains:
            Noise(domain, self.noise_std, self.noise_seed)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, class_names: list[str], multi_label: bool,
                           prefix: str, notes: list[str]) -> dict[str, float]:
    if multi_label:
        result = metrics.mean_average_precision(scores, labels, class_names)
        if result.skipped:
            notes.append(f"{prefix}: {result.note()}")
        return {f"{prefix}/mAP": result.value}
    out = {f"{prefix}/top1": metrics.topk_accuracy(scores, labels, 1)}
    if len(class_names) >= 5:
        out[f"{prefix}/top5"] = metrics.topk_accuracy(scores, labels, 5)
    return out


def _retrieval(embedding: torch.Tensor, caption_embeddings: torch.Tensor, owner: list[int]) -> dict[str, float]:
    result = metrics.retrieval_metrics(embedding @ caption_embeddings.T, owner)
    return {f"retrieval/{key}": value for key, value in result.items()}


def evaluate_set(model, clip_set: ClipSet, options: EvalOptions, log=print) -> dict:
    """All requested tasks on one ClipSet: {"conditions": {"clean": {...}, "noisy-...": {...}}, ...}."""
    notes = list(clip_set.notes)
    conditions: dict[str, dict[str, float]] = {"clean": {}}
    has_labels = clip_set.labels is not None
    has_captions = clip_set.captions is not None
    run_probe = "probe" in options.tasks and has_labels and options.probes
    # A set is multi-label when its test or its training clips ever carry != 1 label.
    multi_label = clip_set.multi_label or (clip_set.train is not None and clip_set.train.multi_label)
    if run_probe and clip_set.train is None:
        if not any(note.startswith("zero-shot only") for note in notes):
            notes.append("probe skipped: no training clips for this set")
        run_probe = False
    want_conditioning = run_probe and "decoder" in options.probes
    start = time.perf_counter()
    clean = extract_features(model, clip_set.waves, options.batch_size, None, conditioning=want_conditioning)
    log(f"  {clip_set.name}: {len(clip_set.waves)} clips encoded in {time.perf_counter() - start:.1f} s")

    prompt_embeddings = class_prompt_embeddings(model, clip_set.class_names) if has_labels else None
    caption_embeddings, owner = None, None
    if has_captions and "retrieval" in options.tasks:
        flat = [caption for captions in clip_set.captions for caption in captions]
        owner = [clip for clip, captions in enumerate(clip_set.captions) for _ in captions]
        caption_embeddings = model.encode_text(flat).cpu()

    def score(features: dict, condition: str):
        out = conditions.setdefault(condition, {})
        if has_labels and "zero-shot" in options.tasks:
            cosine = features["embedding"] @ prompt_embeddings.T
            out.update(classification_metrics(cosine, clip_set.labels, clip_set.class_names, multi_label,
                                              "zero-shot", notes if condition == "clean" else []))
        if caption_embeddings is not None:
            out.update(_retrieval(features["embedding"], caption_embeddings, owner))

    score(clean, "clean")
    if run_probe:
        train_features = extract_features(model, clip_set.train.waves, options.batch_size, None,
                                          conditioning=want_conditioning)
        for probe in options.probes:
            if probe == "decoder":
                scores = decoder_probe(train_features["conditioning"], clip_set.train.labels, clean["conditioning"],
                                       multi_label, options.probe_training)
            else:
                scores = logistic_probe(train_features["embedding"], clip_set.train.labels, clean["embedding"],
                                        multi_label, seed=options.probe_training.seed)
            conditions["clean"].update(classification_metrics(scores, clip_set.labels, clip_set.class_names,
                                                              multi_label, f"probe-{probe}", []))
    if "noisy" in options.tasks and (has_labels or caption_embeddings is not None):
        for domain in options.noise_domains:
            noise = Noise(domain, options.noise_std, options.noise_seed)
            score(extract_features(model, clip_set.waves, options.batch_size, noise), noise.name)
    return {
        "num_clips": len(clip_set.waves),
        "num_classes": len(clip_set.class_names) if has_labels else 0,
        "multi_label": multi_label,
        "num_captions": sum(len(c) for c in clip_set.captions) if has_captions else 0,
        "probe_train_clips": len(clip_set.train.waves) if clip_set.train is not None else 0,
        "skipped_files": clip_set.skipped + (clip_set.train.skipped if clip_set.train is not None else 0),
        "conditions": conditions,
        "notes": notes,
    }


DEFINITIONS = {
    "zero-shot/top1, top5": "fraction of clips whose class is among the 1 / 5 classes with the highest cosine(z_a, prompt)",
    "zero-shot/mAP, probe-*/mAP": "macro mean over classes with a positive clip of sklearn average_precision_score",
    "probe-decoder": "1-layer transformer decoder head on conditioning(audio), trained on the train split",
    "probe-logreg": "sklearn LogisticRegression on z_a (one-vs-rest for multi-label), trained on the train split",
    "retrieval/*": "LAION-CLAP/WavCaps protocol, see collat.metrics (R@k and MRR use the best-ranked relevant caption)",
    "noisy-waveform": "Gaussian noise (std, seed below) added to the 16 kHz waveform",
    "noisy-fbank": "Gaussian noise (std, seed below) added to the normalised fbank, the domain of L_ut",
}


def run_evaluation(model, sets: list[ClipSet], options: EvalOptions, log=print) -> dict:
    options.validate()
    results = {"sets": {}, "options": {**asdict(options), "tasks": list(options.tasks)},
               "definitions": DEFINITIONS}
    for clip_set in sets:
        results["sets"][clip_set.name] = evaluate_set(model, clip_set, options, log)
    return results


def format_table(results: dict) -> str:
    """Markdown table: one row per (set, metric), one column per condition."""
    conditions = ["clean"] + sorted({c for s in results["sets"].values() for c in s["conditions"]} - {"clean"})
    lines = ["| set | metric | " + " | ".join(conditions) + " |", "|---|---|" + "---:|" * len(conditions)]
    for set_name, set_result in results["sets"].items():
        names = list(dict.fromkeys(k for c in conditions for k in set_result["conditions"].get(c, {})))
        for metric in names:
            cells = []
            for condition in conditions:
                value = set_result["conditions"].get(condition, {}).get(metric)
                cells.append("-" if value is None else f"{value:.4f}")
            lines.append(f"| {set_name} | {metric} | " + " | ".join(cells) + " |")
    notes = [f"- {name}: {note}" for name, s in results["sets"].items() for note in s["notes"]]
    return "\n".join(lines + ([""] + notes if notes else []))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collat.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + model.safetensors), "
                                                  "or a training run directory holding checkpoint/")
    p.add_argument("--manifest", action="append", default=[], help="CSV/JSONL manifest (repeatable)")
    p.add_argument("--manifest-root", help="folder that relative manifest paths start from (default: the manifest's)")
    p.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    p.add_argument("--train-split", default="train", help="manifest split that trains the probes (default train)")
    p.add_argument("--embedded", action="store_true", help="also evaluate the embedded soundfont sets "
                                                           "(the default when no --manifest is given)")
    p.add_argument("--test-size", type=int, default=200, help="clips per embedded test set (held-out: half)")
    p.add_argument("--train-size", type=int, default=400, help="embedded clips that train each probe")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--tasks", type=_comma_list, default=TASKS, help=f"comma list of {','.join(TASKS)}")
    p.add_argument("--probe", choices=["decoder", "logreg", "both", "none"], default="decoder",
                   help="linear-probe head (default decoder, the paper's)")
    p.add_argument("--probe-epochs", type=int, default=60)
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--noise-domain", choices=["waveform", "fbank", "both"], default="both")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quick", action="store_true", help="small sets (48 test / 96 train clips, 30 probe epochs)")
    p.add_argument("--out", default="results/evaluate.json", help="JSON results path (written atomically)")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.quick:
            args.test_size, args.train_size, args.probe_epochs = 48, 96, 30
        probes = {"decoder": ("decoder",), "logreg": ("logreg",), "both": PROBES, "none": ()}[args.probe]
        domains = NOISE_DOMAINS if args.noise_domain == "both" else (args.noise_domain,)
        options = EvalOptions(tuple(args.tasks), probes, domains, args.noise_std, args.noise_seed, args.batch_size,
                              ProbeTraining(epochs=args.probe_epochs, seed=args.data_seed))
        options.validate()
        if args.test_size < 1 or args.train_size < 0:
            raise ValueError(f"--test-size must be >= 1 and --train-size >= 0, got {args.test_size}, {args.train_size}")
        model = load_model(args.model, resolve_device(args.device))
        clip_seconds = model.config.clip_seconds
        sets: list[ClipSet] = []
        for manifest in args.manifest:
            sets += manifest_sets(manifest, clip_seconds, args.split, args.train_split, args.manifest_root)
        if args.embedded or not args.manifest:
            sets += embedded_sets(clip_seconds, args.test_size, args.train_size, args.data_seed,
                                  probe="probe" in options.tasks and bool(probes))
        log = (lambda message: print(message, file=sys.stderr)) if args.json else print
        results = run_evaluation(model, sets, options, log)
        results["model"] = os.path.abspath(args.model)
        results["model_config"] = asdict(model.config)
        atomic_write_text(args.out, json.dumps(results, indent=2))
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        print(f"collat.evaluate: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    if not args.json:
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
