"""`python -m collat.evaluate --model DIR`: the evaluation command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from collat.device import resolve_device
from collat.evaluate.features import NOISE_DOMAINS
from collat.evaluate.probes import ProbeTraining
from collat.evaluate.sets import ClipSet, embedded_sets, manifest_sets
from collat.evaluate.tasks import PROBES, TASKS, EvalOptions, format_table, run_evaluation
from collat.fileio import atomic_write_text
from collat.model import load_model

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

The table goes to stdout and the JSON results to --out (written atomically)."""


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collat.evaluate", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
