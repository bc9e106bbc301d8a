"""`python -m collat.evaluate --model DIR`: the evaluation command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from collat.device import resolve_device
from collat.evaluate.cli_support import (
    CheckpointError,
    load_model_checked,
    non_negative_float,
    non_negative_int,
    positive_int,
)
from collat.evaluate.features import NOISE_DOMAINS
from collat.evaluate.probes import ProbeTraining
from collat.evaluate.sets import (
    ClipSet,
    embedded_sets,
    fold_sets,
    manifest_sets,
    progress,
)
from collat.evaluate.tasks import (
    PROBES,
    TASKS,
    EvalOptions,
    format_table,
    run_evaluation,
)
from collat.fileio import atomic_write_text, check_writable

EXIT_ERROR = 1
DESCRIPTION = """Evaluate a trained CoLLAT: zero-shot classification, linear probes, audio-text retrieval and
robustness to noisy audio (paper Tables 2 and 3), on the embedded soundfont sets and on manifests."""
EPILOG = """tasks:
  zero-shot  cosine between the clip embedding and "This is a sound of {label}" for every class:
             top-1/top-5 accuracy on single-label sets, macro mAP on multi-label sets
  probe      a classifier on the frozen model's features, trained on the train split: "decoder" (the
             paper's 1-layer transformer decoder head) or "logreg" (logistic regression on z_a)
  retrieval  audio->text and text->audio R@1/5/10, MRR, mAP@10 on sets with captions
  noisy      zero-shot and retrieval again with seeded Gaussian noise (--noise-std) on the waveform
             (the paper's noisy-audio test) and/or on the normalised fbank

embedded sets (test split): seen-single (30 seen classes), heldout-single (6 classes never trained
on), seen-mixture (2-3 sources: mAP and retrieval). A manifest (CSV/JSONL: path, labels or caption(s),
split) gives one set from its --split rows; its --train-split rows train the probes.

cross-validation (--folds): each split of a manifest (or each of ESC-50's 5 folds with --esc50) is in
turn the test set, zero-shot on it and probes trained on the other folds; the table shows every fold
and the mean over the folds (the protocol of the paper's and the CLAP papers' ESC-50 figures).

The table goes to stdout first, then the JSON results to --out (written atomically; a folder that
cannot be written is reported before the evaluation starts, a write that fails after it is reported
after the table, with exit status 1)."""
ESC50_FOLDS = 5


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collat.evaluate", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + model.safetensors), "
                                                  "or a training run directory holding checkpoint/")
    p.add_argument("--manifest", action="append", default=[], help="CSV/JSONL manifest (repeatable)")
    p.add_argument("--manifest-root", help="folder that relative manifest paths start from (default: the manifest's)")
    p.add_argument("--esc50", metavar="ROOT", help="the unpacked ESC-50 folder (meta/esc50.csv, audio/): fold 5 "
                                                   "tested, folds 1-3 train the probes; all 5 folds with --folds")
    p.add_argument("--folds", action="store_true", help="cross-validation over the splits of each manifest "
                                                        "(ESC-50: its 5 folds), reported per fold and as the mean")
    p.add_argument("--split", default="test", help="manifest split to evaluate (default test)")
    p.add_argument("--train-split", default="train", help="manifest split that trains the probes (default train)")
    p.add_argument("--embedded", action="store_true", help="also evaluate the embedded soundfont sets "
                                                           "(the default when no --manifest is given)")
    p.add_argument("--other-soundfont", metavar="SF2", help="with the embedded sets: also the seen classes rendered "
                   "from this General MIDI soundfont (recordings never heard in training; e.g. Debian's "
                   "timgm6mb-soundfont: /usr/share/sounds/sf2/TimGM6mb.sf2)")
    p.add_argument("--test-size", type=positive_int, default=200, help="clips per embedded test set (held-out: half)")
    p.add_argument("--train-size", type=non_negative_int, default=400, help="embedded clips that train each probe")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--tasks", type=_comma_list, default=TASKS, help=f"comma list of {','.join(TASKS)}")
    p.add_argument("--probe", choices=["decoder", "logreg", "both", "none"], default="decoder",
                   help="linear-probe head (default decoder, the paper's)")
    p.add_argument("--probe-epochs", type=positive_int, default=60)
    p.add_argument("--noise-std", type=non_negative_float, default=0.1)
    p.add_argument("--noise-domain", choices=["waveform", "fbank", "both"], default="both")
    p.add_argument("--noise-seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--quick", action="store_true", help="small sets (48 test / 96 train clips, 30 probe epochs)")
    p.add_argument("--out", default="results/evaluate.json", help="JSON results path (written atomically)")
    p.add_argument("--json", action="store_true", help="print the JSON results instead of the table")
    return p


def fold_means(results: dict, name: str, folds: list[str]) -> None:
    """Add the set NAME/mean of K folds: each metric of each condition averaged over the folds' sets."""
    per_fold = [results["sets"][f"{name}/{fold}"] for fold in folds]
    conditions = {}
    for condition in per_fold[0]["conditions"]:
        metrics = set.intersection(*(set(s["conditions"].get(condition, {})) for s in per_fold))
        conditions[condition] = {metric: sum(s["conditions"][condition][metric] for s in per_fold) / len(per_fold)
                                 for metric in sorted(metrics)}
    results["sets"][f"{name}/mean of {len(folds)} folds"] = {
        "folds": folds, "num_clips": sum(s["num_clips"] for s in per_fold), "conditions": conditions,
        "notes": [f"mean over the folds {', '.join(folds)}; each fold tested once, its probes trained on the others"]}


def build_sets(args, options: EvalOptions, clip_seconds: float) -> tuple[list[ClipSet], dict[str, list[str]]]:
    """The sets to evaluate, and for cross-validation {name: its folds} (the sets NAME/FOLD)."""
    from collat.data.readers import esc50_entries

    sources = [(manifest, None) for manifest in args.manifest]
    if args.esc50:
        folds = {k: f"fold{k}" for k in range(1, ESC50_FOLDS + 1)} if args.folds else None
        sources.append((esc50_entries(args.esc50, folds), "esc50"))
    sets, cross_validation = [], {}
    for source, name in sources:
        if args.folds:
            folded = fold_sets(source, clip_seconds, args.manifest_root, name)
            base = folded[0].name.rsplit("/", 1)[0]
            cross_validation[base] = [clip_set.name.rsplit("/", 1)[1] for clip_set in folded]
            sets += folded
        else:
            found = manifest_sets(source, clip_seconds, args.split, args.train_split, args.manifest_root)
            if name:
                for clip_set in found:
                    clip_set.name = clip_set.name.replace("manifest", name, 1)
            sets += found
    if args.embedded or not sources:
        sets += embedded_sets(clip_seconds, args.test_size, args.train_size, args.data_seed,
                              probe="probe" in options.tasks and bool(options.probes),
                              other_soundfont=args.other_soundfont)
    return sets, cross_validation


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def fail(message: str) -> int:
        print(f"collat.evaluate: error: {message}", file=sys.stderr)
        return EXIT_ERROR

    try:
        if args.quick:
            args.test_size, args.train_size, args.probe_epochs = 48, 96, 30
        if not args.tasks:
            raise ValueError(f"--tasks names no task; give a comma list of {','.join(TASKS)}")
        if args.folds and not (args.manifest or args.esc50):
            raise ValueError("--folds needs a --manifest (its splits are the folds) or --esc50 ROOT")
        probes = {"decoder": ("decoder",), "logreg": ("logreg",), "both": PROBES, "none": ()}[args.probe]
        domains = NOISE_DOMAINS if args.noise_domain == "both" else (args.noise_domain,)
        options = EvalOptions(tuple(args.tasks), probes, domains, args.noise_std, args.noise_seed, args.batch_size,
                              ProbeTraining(epochs=args.probe_epochs, seed=args.data_seed))
        options.validate()
        check_writable(args.out)
    except OSError as error:
        return fail(f"--out {args.out} cannot be written ({error}); nothing was evaluated")
    except ValueError as error:
        return fail(str(error))
    try:
        model = load_model_checked(args.model, resolve_device(args.device))
        sets, cross_validation = build_sets(args, options, model.config.clip_seconds)
        log = (lambda message: print(message, file=sys.stderr)) if args.json else print
        results = None
        for clip_set in progress(sets, "evaluating"):  # one set at a time, for the progress bar
            part = run_evaluation(model, [clip_set], options, log)
            results = part if results is None else {**results, "sets": {**results["sets"], **part["sets"]}}
        for name, folds in cross_validation.items():
            fold_means(results, name, folds)
        results["model"] = os.path.abspath(args.model)
        results["model_config"] = asdict(model.config)
    except (FileNotFoundError, CheckpointError, ValueError, TypeError, ImportError, RuntimeError, OSError) as error:
        return fail(str(error))
    print(json.dumps(results, indent=2) if args.json else format_table(results), flush=True)
    try:
        atomic_write_text(args.out, json.dumps(results, indent=2))
    except OSError as error:
        return fail(f"the results above could not be written to --out {args.out}: {error}")
    if not args.json:
        print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
