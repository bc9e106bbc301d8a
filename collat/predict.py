"""`python -m collat.predict FILE... --model DIR --labels a b c`: zero-shot ranking of labels per file,
long files averaged over windows of the model's clip length (the rules are in --help)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

from collat.data.audio_io import AudioReadError, audio_info, load_audio
from collat.device import resolve_device
from collat.evaluate.cli_support import (
    CheckpointError,
    load_model_checked,
    positive_float,
    positive_int,
)
from collat.fileio import atomic_write_text, check_writable
from collat.model import inference
from collat.prompts import make_prompt

EXIT_ERROR = 1
LONG_AUDIO = ("windows", "crop", "error")
DESCRIPTION = """Rank candidate labels for audio files with a trained CoLLAT (zero-shot: each label's prompt
"This is a sound of {label}" against each file)."""
EPILOG = """scores: by default a softmax over the labels (probabilities that sum to 1); with --multi-label the
cosine similarity of each label on its own (labels do not compete).

long files: cut into consecutive windows of the model's clip length whose embeddings are averaged before
scoring (--long-audio windows, the default, the rule of the model's Python API; a last piece shorter than
half a window is dropped unless it is the only one), or only the first window (crop), or refused (error).

exit status: 0 when every file was scored; 1 when a file could not be (the others are still printed) or
when the labels, the model or the options are wrong, or --out could not be written (after the results
are printed)."""


def read_labels(labels: list[str] | None, labels_file: str | None) -> list[str]:
    """The label list from --labels and/or --labels-file (one per line); checked for blanks and duplicates."""
    names = list(labels or [])
    if labels_file is not None:
        if not os.path.isfile(labels_file):
            raise FileNotFoundError(f"--labels-file not found: {labels_file}")
        with open(labels_file, encoding="utf-8") as handle:
            names += [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise ValueError("no labels given: pass --labels a b c (or --labels-file FILE with one label per line)")
    blank = [i for i, name in enumerate(names) if not name.strip()]
    if blank:
        raise ValueError(f"labels must be non-empty text; label #{blank[0] + 1} is blank")
    names = [name.strip() for name in names]
    seen, duplicates = set(), []
    for name in names:
        if name.lower() in seen:
            duplicates.append(name)
        seen.add(name.lower())
    if duplicates:
        raise ValueError(f"duplicate labels (compared case-insensitively): {sorted(set(duplicates))}")
    return names


def check_labels_fit(model, labels: list[str]) -> None:
    """Refuse a label whose prompt would be cut by the text encoder's context length."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for label in labels:
            model.text.tokenize([make_prompt([label])])
            if any("truncated" in str(w.message) for w in caught):
                raise ValueError(
                    f"label {label!r} is too long: its prompt does not fit the model's text context of "
                    f"{model.context_length} tokens"
                )


def load_clips(paths: list[str], sample_rate: int, clip_seconds: float, min_seconds: float, max_seconds: float,
               long_audio: str):
    """Read every file; returns (clips, errors): clips are (path, seconds, wave, windows) with the wave the
    model scores (cut to one window for --long-audio crop) and its window count; errors (path, message)."""
    window = int(round(clip_seconds * sample_rate))
    clips, errors = [], []
    for path in paths:
        try:
            wave = load_audio(path, sample_rate)
        except AudioReadError as error:
            errors.append((path, f"cannot read audio: {error.reason}"))
            continue
        seconds = wave.shape[0] / sample_rate
        if seconds < min_seconds:
            errors.append((path, f"audio too short: {seconds:.3f} s, need at least {min_seconds} s (--min-seconds)"))
        elif seconds > max_seconds:
            errors.append((path, f"audio too long: {seconds:.1f} s, the limit is {max_seconds} s (--max-seconds)"))
        elif seconds > clip_seconds and long_audio == "error":
            errors.append((path, f"audio longer than the model's {clip_seconds} s clips ({seconds:.1f} s); "
                                 "use --long-audio windows or crop"))
        else:
            if long_audio == "crop":
                wave = wave[:window]
            clips.append((path, seconds, wave, inference.window_count(wave.shape[0], window)))
    return clips, errors


def predict(model, clips, labels: list[str], multi_label: bool, batch_size: int = 32) -> list[torch.Tensor]:
    """Scores [C] per clip: model.zero_shot of each clip's wave (long waves: the model's window rule)."""
    if not clips:
        return []
    scores = model.zero_shot([wave for _, _, wave, _ in clips], labels, multi_label=multi_label, batch_size=batch_size)
    return list(scores.cpu())


def format_ranking(path: str, scores: torch.Tensor, labels: list[str], top_k: int, windows: int) -> str:
    order = torch.argsort(scores, descending=True, stable=True)[:top_k].tolist()
    width = max(len(labels[i]) for i in order)
    header = path + (f"  ({windows} windows averaged)" if windows > 1 else "")
    return "\n".join([header] + [f"  {rank:>2}. {labels[i]:<{width}}  {scores[i].item():.4f}"
                                 for rank, i in enumerate(order, start=1)])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collat.predict", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (WAV, FLAC, OGG, ...)")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="candidate labels (quote multi-word labels)")
    p.add_argument("--labels-file", help="file with one label per line (added to --labels)")
    p.add_argument("--multi-label", action="store_true", help="score labels independently (cosine) instead of softmax")
    p.add_argument("--top-k", type=positive_int, default=5, help="labels shown per file (default 5; all if fewer)")
    p.add_argument("--long-audio", choices=LONG_AUDIO, default="windows")
    p.add_argument("--min-seconds", type=positive_float, default=0.1)
    p.add_argument("--max-seconds", type=positive_float, default=600.0,
                   help="longer files are refused from their header, before any of them is decoded")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--json", action="store_true", help="print JSON instead of the ranking table")
    p.add_argument("--out", help="also write the JSON to this file (atomically)")
    return p


def too_long_by_header(paths: list[str], max_seconds: float) -> list[tuple[str, str]]:
    """(path, message) for files whose header says they exceed max_seconds: refused before decoding, so
    memory never depends on what a header claims. Unreadable headers are left to load_clips to report."""
    refused = []
    for path in paths:
        try:
            frames, rate = audio_info(path)
        except AudioReadError:
            continue
        if frames / rate > max_seconds:
            refused.append((path, f"audio too long: {frames / rate:.1f} s, the limit is {max_seconds} s (--max-seconds)"))
    return refused


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"collat.predict: error: {message}", file=sys.stderr)
        return EXIT_ERROR

    try:
        labels = read_labels(args.labels, args.labels_file)
        if not args.min_seconds <= args.max_seconds:
            raise ValueError(f"need --min-seconds <= --max-seconds, got {args.min_seconds} and {args.max_seconds}")
        if args.out:
            check_writable(args.out)
        model = load_model_checked(args.model, resolve_device(args.device))
        check_labels_fit(model, labels)
        min_seconds = max(args.min_seconds, model.frontend.min_samples / model.frontend.sample_rate)
        refused = too_long_by_header(args.files, args.max_seconds)
        readable = [path for path in args.files if path not in {path for path, _ in refused}]
        clips, errors = load_clips(readable, model.frontend.sample_rate, model.config.clip_seconds, min_seconds,
                                   args.max_seconds, args.long_audio)
        errors = refused + errors
        scores = predict(model, clips, labels, args.multi_label, args.batch_size)
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            return fail(str(error))
        return fail(f"--out {args.out} cannot be written ({error})" if args.out else str(error))
    except (CheckpointError, ValueError, TypeError, ImportError, RuntimeError) as error:
        return fail(str(error))

    top_k = min(args.top_k, len(labels))
    payload = {
        "model": os.path.abspath(args.model),
        "labels": labels,
        "multi_label": args.multi_label,
        "score": "cosine" if args.multi_label else "softmax probability",
        "predictions": [
            {"file": path, "seconds": round(seconds, 3), "windows": windows,
             "ranking": [{"label": labels[i], "score": float(s[i])}
                         for i in torch.argsort(s, descending=True, stable=True)[:top_k].tolist()]}
            for (path, seconds, _, windows), s in zip(clips, scores)
        ],
        "errors": [{"file": path, "error": message} for path, message in errors],
    }
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print("\n\n".join(format_ranking(path, s, labels, top_k, windows)
                          for (path, _, _, windows), s in zip(clips, scores)))
    for path, message in errors:
        print(f"collat.predict: error: {path}: {message}", file=sys.stderr)
    if args.out:
        try:
            atomic_write_text(args.out, json.dumps(payload, indent=2))
        except OSError as error:
            return fail(f"the results above could not be written to --out {args.out}: {error}")
    return EXIT_ERROR if errors else 0


if __name__ == "__main__":
    sys.exit(main())
