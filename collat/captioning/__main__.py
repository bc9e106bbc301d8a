"""`python -m collat.captioning [train] --model DIR`: train a captioning decoder on a frozen CoLLAT and
score its greedy and beam-search captions (the default subcommand);
`python -m collat.captioning caption FILE... --captioner DIR [--model DIR]`: caption new files with a
saved captioner."""
from __future__ import annotations

import argparse
import json
import os
import sys

from collat.captioning import aac
from collat.captioning.caption import (
    FEATURES,
    Captioner,
    caption_files,
    extract_memory,
    recorded_model,
)
from collat.captioning.decoder import (
    CaptionerConfig,
    CaptionTraining,
    save_captioner,
    train_captioner,
)
from collat.captioning.metrics import SCORERS, TOKENIZERS, caption_metrics
from collat.captioning.vocab import Vocabulary
from collat.data.gm_sounds import SEEN_CLASSES
from collat.data.manifest import ManifestDataset, read_manifest
from collat.device import resolve_device
from collat.evaluate.sets import load_manifest_rows, soundfont_set
from collat.fileio import atomic_write_text
from collat.model import load_model


def embedded_captioned(split: str, size: int, clip_seconds: float, seed: int = 0):
    """Soundfont clips of 1-3 seen classes; the captions of a clip are its template prompt in every
    order of its class names (the template says nothing about order)."""
    clip_set = soundfont_set("soundfont/captioned", split, size, SEEN_CLASSES, (1, 3), seed, clip_seconds, captions=True)
    return clip_set.waves, clip_set.captions


def manifest_captioned(path: str, split: str | None, clip_seconds: float, root: str | None = None):
    """Waves and captions of a manifest split (rows without captions are an error); unreadable files
    are reported and skipped."""
    entries = read_manifest(path, root)
    splits = sorted({entry.split for entry in entries})
    if splits == [""]:
        split = None
    elif split not in splits:
        raise ValueError(f"manifest {path} has no rows in split {split!r}; its splits are {splits}")
    dataset = ManifestDataset(entries, split=split, clip_seconds=clip_seconds, mode="eval", text="caption")
    waves, kept, _ = load_manifest_rows(dataset, f"{path}:{split or 'all'}")
    return waves, [list(dataset.entries[i].captions) for i in kept]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m collat.captioning [train]",
        description="Train a 1-layer transformer captioning decoder on a frozen CoLLAT (paper §5.3) and score "
                    "greedy and beam-search captions with BLEU-1..4, ROUGE-L, CIDEr-D (from aac-metrics when it "
                    "is installed; METEOR/SPICE when Java + aac-metrics + its jars are present).",
        epilog="subcommands: train (the default) | caption FILE... --captioner DIR: caption new files with a "
               "captioner saved by --save (python -m collat.captioning caption --help)",
    )
    p.add_argument("--model", required=True, help="CoLLAT checkpoint directory")
    p.add_argument("--manifest", help="captioned manifest (AudioCaps layout: path, caption(s), split); "
                                      "default: the embedded soundfont clips with template captions")
    p.add_argument("--manifest-root")
    p.add_argument("--train-split", default="train")
    p.add_argument("--split", default="test", help="split to caption and score")
    p.add_argument("--train-size", type=int, default=512, help="embedded training clips")
    p.add_argument("--test-size", type=int, default=128, help="embedded test clips")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--features", choices=FEATURES, default="conditioning")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--max-words", type=int, default=30)
    p.add_argument("--min-count", type=int, default=1, help="words seen fewer times become <unk>")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam ranking by log p / length**penalty (1 = mean log-prob per word; 0 favours short captions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--save", help="write the trained captioner here (a folder, replaced atomically)")
    p.add_argument("--out", default="results/captioning.json", help="JSON results (written atomically)")
    p.add_argument("--no-external", action="store_true", help="skip METEOR/SPICE even when available")
    p.add_argument("--scorer", choices=SCORERS, default="auto",
                   help="BLEU/ROUGE-L/CIDEr-D implementation (auto: aac-metrics when installed, else built-in)")
    p.add_argument("--tokenizer", choices=TOKENIZERS, default="auto",
                   help="caption tokenizer before scoring (auto: PTB where aac-metrics, Java and its jar are present)")
    return p


def build_caption_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collat.captioning caption",
                                description="Caption audio files with a saved captioner on its frozen CoLLAT.")
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (any rate; long files: windows averaged)")
    p.add_argument("--captioner", required=True, help="captioner folder written by `train --save`")
    p.add_argument("--model", help="CoLLAT checkpoint (default: the one the captioner recorded)")
    p.add_argument("--beam", type=int, help="beam size, 1 = greedy (default: the one the captioner was scored with)")
    p.add_argument("--length-penalty", type=float, help="beam ranking by log p / length**penalty (default: as scored)")
    p.add_argument("--batch-size", type=int, default=16, help="files read and captioned at a time")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print JSON instead of one 'FILE<TAB>caption' line per file")
    p.add_argument("--out", help="also write the JSON to this file (atomically)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["caption"]:
        return caption_main(argv[1:])
    if argv[:1] == ["train"]:
        argv = argv[1:]
    return train_main(argv)


def train_main(argv) -> int:
    args = build_parser().parse_args(argv)
    try:
        for name in ("epochs", "batch_size", "beam", "dim", "max_words", "train_size", "test_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        device = resolve_device(args.device)
        model = load_model(args.model, device)
        clip_seconds = model.config.clip_seconds
        if args.manifest:
            train_waves, train_captions = manifest_captioned(args.manifest, args.train_split, clip_seconds, args.manifest_root)
            test_waves, test_captions = manifest_captioned(args.manifest, args.split, clip_seconds, args.manifest_root)
        else:
            train_waves, train_captions = embedded_captioned("train", args.train_size, clip_seconds, args.data_seed)
            test_waves, test_captions = embedded_captioned("test", args.test_size, clip_seconds, args.data_seed)
        train_memory = extract_memory(model, train_waves, args.features).to(device)
        test_memory = extract_memory(model, test_waves, args.features).to(device)
        vocab = Vocabulary.build([c for cs in train_captions for c in cs], args.min_count)
        config = CaptionerConfig(memory_dim=train_memory.shape[2], memory_len=train_memory.shape[1],
                                 vocab_size=len(vocab), dim=args.dim, num_heads=4 if args.dim % 4 == 0 else 1,
                                 ff_dim=4 * args.dim, max_words=args.max_words)
        decoder, history = train_captioner(
            train_memory, train_captions, vocab, config,
            CaptionTraining(args.epochs, args.batch_size, args.lr, seed=args.seed), log=print)
        greedy = [vocab.decode(ids) for ids in decoder.greedy(test_memory, vocab)]
        beam = [vocab.decode(ids) for ids in decoder.beam_search(test_memory, vocab, args.beam, None, args.length_penalty)]
        scoring = dict(external=not args.no_external, scorer=args.scorer, tokenizer=args.tokenizer)
        results = {
            "model": os.path.abspath(args.model), "features": args.features, "vocab_size": len(vocab),
            "train_clips": len(train_waves), "test_clips": len(test_waves), "train_loss": history,
            "greedy": caption_metrics(greedy, test_captions, **scoring),
            f"beam{args.beam}": caption_metrics(beam, test_captions, **scoring),
            "examples": [{"references": refs, "greedy": g, f"beam{args.beam}": b}
                         for refs, g, b in list(zip(test_captions, greedy, beam))[:5]],
        }
        results["tokenizer"] = aac.TOKENIZER_NAMES[results["greedy"]["tokenizer"]]
        results["scorer"] = results["greedy"]["scorer"]
        if args.save:
            save_captioner(args.save, decoder, vocab, {
                "collat_model": os.path.abspath(args.model), "features": args.features,
                "decoding": {"beam": args.beam, "length_penalty": args.length_penalty}})
        atomic_write_text(args.out, json.dumps(results, indent=2))
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        print(f"collat.captioning: error: {error}", file=sys.stderr)
        return 1
    names = ["BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "ROUGE_L", "CIDEr-D", "METEOR", "SPICE"]
    print("| decoding | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names))
    for decoding in ("greedy", f"beam{args.beam}"):
        row = results[decoding]
        print(f"| {decoding} | " + " | ".join("n/a" if row[n] is None else f"{row[n]:.4f}" for n in names) + " |")
    print(f"scores: {results['scorer']}; tokenizer: {results['tokenizer']}")
    for note in results["greedy"]["notes"]:
        print(f"note: {note}")
    print(f"results written to {args.out}")
    return 0


def caption_main(argv) -> int:
    args = build_caption_parser().parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        captioner = Captioner.load(args.captioner, device)
        model_path = args.model or recorded_model(captioner)
        if model_path is None:
            raise ValueError(f"the captioner does not record a CoLLAT that exists here "
                             f"({captioner.meta.get('collat_model')}); pass --model DIR")
        model = load_model(model_path, device)
        captioner.check_model(model)
        decoding = captioner.meta.get("decoding", {})
        beam = args.beam if args.beam is not None else decoding.get("beam", 3)
        penalty = args.length_penalty if args.length_penalty is not None else decoding.get("length_penalty", 1.0)
        if beam < 1:
            raise ValueError(f"--beam must be >= 1, got {beam}")
        results, errors = [], []
        for path, caption, error in caption_files(model, captioner, args.files, beam, penalty, args.batch_size):
            if error is None:
                results.append({"file": path, "caption": caption})
                if not args.json:
                    print(f"{path}\t{caption}", flush=True)
            else:
                errors.append({"file": path, "error": error})
                print(f"collat.captioning: error: {path}: {error}", file=sys.stderr)
        payload = {"model": os.path.abspath(model_path), "captioner": os.path.abspath(args.captioner),
                   "beam": beam, "length_penalty": penalty, "captions": results, "errors": errors}
        if args.json:
            print(json.dumps(payload, indent=2))
        if args.out:
            atomic_write_text(args.out, json.dumps(payload, indent=2))
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError, OSError) as error:
        print(f"collat.captioning: error: {error}", file=sys.stderr)
        return 1
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
