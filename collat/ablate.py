"""`python -m collat.ablate`: the paper's loss ablation (Table 3a) on the embedded soundfont data: one
model per row, trained alike except for the loss term or matching the row changes, evaluated alike."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from collat import fileio
from collat.config import load_preset
from collat.device import resolve_device
from collat.evaluate import DEFINITIONS, EvalOptions, embedded_sets, run_evaluation
from collat.model import CoLLAT, load_model
from collat.train import run

ROWS = {
    "full": {},
    "no-ct": {"lambda_ct": 0.0},
    "no-ut": {"lambda_ut": 0.0, "twins_in_main_losses": False},
    "no-cg": {"lambda_cg": 0.0},
    "optimal": {"matching": "optimal"},
}
UNTRAINED = "untrained"
SETS = ("soundfont/seen-single", "soundfont/seen-mixture")
COLUMNS = [("soundfont/seen-single", "zero-shot/top1", "single top-1"),
           ("soundfont/seen-mixture", "zero-shot/mAP", "mixture mAP")]
CONDITIONS = ("clean", "noisy-waveform", "noisy-fbank")
DESCRIPTION = """The paper's loss ablation (Table 3a) on the embedded soundfont data. Every row is trained from the
same initialisation, for the same steps on the same batches, and evaluated on the same clips."""
EPILOG = """rows:
  untrained   no training (the floor)
  full        L = lambda_ct L_ct + lambda_cg L_cg + lambda_ut L_ut (the preset's weights)
  no-ct       without L_ct (lambda_ct = 0)
  no-ut       without L_ut (lambda_ut = 0) and without noisy twins in L_ct and L_cg: no noisy audio at all,
              as in the paper, where L_ut is the only place noisy audio enters (its steps are cheaper)
  no-cg       without L_cg (lambda_cg = 0)
  optimal     the full objective with the optimal assignment instead of greedy token matching

columns: zero-shot top-1 on single-source clips of the 30 seen classes (the ESC-50 analogue) and macro
mAP on 2-3-source mixtures (the FSD50K analogue), each clean and with Gaussian noise (--noise-std) on
the waveform and on the normalised fbank.

The paper's directions: without L_ct multi-label mAP drops most; without L_ut noisy accuracy drops.
Differences between rows can be within seed-to-seed noise: --seed 0,1 runs every row with two seeds.

writes OUT/ablation.md (table), OUT/ablation.json and OUT/ablation.png, rewritten after every row;
each row's run folder (checkpoint, log.jsonl, losses.png) is OUT/<row>/ (OUT/seed-S/<row>/ with several seeds)."""


def row_configs(preset: str, rows: list[str]):
    """(name, CoLLATConfig, overrides) per row, from the training preset."""
    def make_model():
        return load_preset(preset)[0]

    out = []
    for name in rows:
        if name == UNTRAINED:
            out.append((name, make_model(), {}))
            continue
        if name not in ROWS:
            raise ValueError(f"unknown ablation row {name!r}; rows are {[UNTRAINED] + list(ROWS)}")
        config = dataclasses.replace(make_model(), **ROWS[name])
        config.validate()
        out.append((name, config, ROWS[name]))
    return out


def evaluation_sets(clip_seconds: float, eval_size: int, seed: int) -> list:
    sets = embedded_sets(clip_seconds, test_size=eval_size, train_size=0, seed=seed, probe=False)
    return [s for s in sets if s.name in SETS]


def train_row(name: str, model_config, args, seed: int, row_dir: str) -> tuple[object, dict]:
    """Train one row with the shared budget and seed; returns (model, the run's result dict)."""
    train_config = dataclasses.replace(
        load_preset(args.preset)[1], steps=args.steps, batch_size=args.batch_size,
        seed=seed, data_seed=seed, out=row_dir, evaluate=False, save_every=max(args.steps, 1),
        progress=args.progress, device=args.device, train_size=max(args.train_size, args.batch_size),
        num_workers=args.num_workers,
    )
    if name == UNTRAINED:
        torch.manual_seed(seed)  # the same initialisation every trained row starts from
        return CoLLAT(model_config).to(resolve_device(args.device)).eval(), {"status": "untrained", "step": 0}
    result = run(model_config, train_config)
    if result.get("status") != "completed":
        raise RuntimeError(f"row {name}: training ended with status {result.get('status')!r}")
    return load_model(row_dir, resolve_device(args.device)), result


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seed must be an integer or a comma list of integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seed must list distinct integers, got {text!r}")
    return seeds


SUMMARY_COLUMNS = [(set_name, metric, label, condition) for set_name, metric, label in COLUMNS
                   for condition in ("clean", "noisy-waveform")]


def _value(row: dict, set_name: str, metric: str, condition: str):
    return row["results"].get(set_name, {}).get(condition, {}).get(metric)


def runs_by_row(rows: list[dict]) -> dict[str, list[dict]]:
    """{row name: its runs (one per seed)}, in the order the rows ran."""
    return {name: [row for row in rows if row["name"] == name] for name in dict.fromkeys(r["name"] for r in rows)}


def summary_rows(rows: list[dict]) -> list[dict]:
    """Per row name: the mean over seeds of each summary column, as "mean (seed a, seed b, ...)" cells."""
    out = []
    for name, runs in runs_by_row(rows).items():
        cells = {}
        for set_name, metric, label, condition in SUMMARY_COLUMNS:
            values = [_value(run, set_name, metric, condition) for run in runs]
            if any(v is None for v in values):
                cells[f"{label} {condition}"] = "-"
                continue
            mean = sum(values) / len(values)
            each = ", ".join(f"{v:.2f}" for v in values)
            cells[f"{label} {condition}"] = f"{mean:.3f}" + (f" ({each})" if len(values) > 1 else "")
        out.append({"row": name, "seeds": [run["seed"] for run in runs], "cells": cells})
    return out


def format_markdown(rows: list[dict], args, chance: float | None = None) -> str:
    seeds = list(dict.fromkeys(row["seed"] for row in rows))
    lines = [f"Loss ablation (paper Table 3a) on the embedded soundfont data: preset {args.preset}, "
             f"{rows[0]['train_steps'] if rows else args.steps} steps of batch {args.batch_size}, "
             f"seed(s) {', '.join(map(str, seeds))}, {args.eval_size} clips per set, noise std {args.noise_std}."
             + (f" Chance single top-1: {chance:.3f}." if chance else ""), ""]
    if len(seeds) > 1:
        header = ["row"] + [f"{label} {condition}" for _, _, label, condition in SUMMARY_COLUMNS]
        lines += ["Mean over the seeds (each seed in brackets):", "",
                  "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for summary in summary_rows(rows):
            lines.append("| " + " | ".join([summary["row"]] + [summary["cells"][h] for h in header[1:]]) + " |")
        lines.append("")
    header = ["row", "seed", "L_ct", "L_cg", "L_ut", "matching"]
    header += [f"{label} {condition}" for _, _, label in COLUMNS for condition in CONDITIONS]
    header += ["train s"]
    lines += (["Every run:", ""] if len(seeds) > 1 else []) + [
        "| " + " | ".join(header) + " |", "|" + "---|" * 6 + "---:|" * (len(header) - 6)]
    for row in rows:
        cfg = row["config"]
        cells = [row["name"], str(row["seed"]), f"{cfg['lambda_ct']:g}", f"{cfg['lambda_cg']:g}",
                 f"{cfg['lambda_ut']:g}", cfg["matching"]]
        for set_name, metric, _ in COLUMNS:
            for condition in CONDITIONS:
                value = _value(row, set_name, metric, condition)
                cells.append("-" if value is None else f"{value:.3f}")
        cells.append(f"{row['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = runs_by_row(rows)
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(6 * len(COLUMNS), 4), squeeze=False)
    width = 0.8 / max(len(grouped), 1)
    for ax, (set_name, metric, label) in zip(axes[0], COLUMNS):
        for r, (name, runs) in enumerate(grouped.items()):
            per_seed = [[_value(run, set_name, metric, c) for run in runs] for c in CONDITIONS]
            means = [sum(v) / len(v) if None not in v else float("nan") for v in per_seed]
            spread = [[m - min(v) for m, v in zip(means, per_seed)], [max(v) - m for m, v in zip(means, per_seed)]] \
                if all(None not in v for v in per_seed) else None
            ax.bar([c + (r - (len(grouped) - 1) / 2) * width for c in range(len(CONDITIONS))], means, width,
                   yerr=spread if len(runs) > 1 else None, capsize=2, label=name)
        ax.set_xticks(range(len(CONDITIONS)), CONDITIONS)
        ax.set_title(label)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def write_outputs(rows: list[dict], args, complete: bool, chance: float | None = None) -> str:
    table = format_markdown(rows, args, chance)
    if not complete:
        table += f"\n(partial: {len(rows)} row(s) done so far)\n"
    payload = {"args": vars(args), "complete": complete, "metrics": [c[:2] for c in COLUMNS],
               "conditions": CONDITIONS,
               "columns": [f"{label} {condition}" for _, _, label, condition in SUMMARY_COLUMNS],
               "summary": summary_rows(rows), "rows": rows, "definitions": DEFINITIONS}
    fileio.atomic_write_text(os.path.join(args.out, "ablation.json"), json.dumps(payload, indent=2))
    fileio.atomic_write_text(os.path.join(args.out, "ablation.md"), table)
    plot(rows, os.path.join(args.out, "ablation.png"))
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m collat.ablate", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per row (same for every row; default: the preset's, i.e. the default run's)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", default="0", help="model init, batch order and data seed of every row; a comma list "
                                               "(e.g. 0,1) runs the whole ablation once per seed and the table "
                                               "shows the mean and each seed")
    p.add_argument("--rows", default=",".join([UNTRAINED] + list(ROWS)),
                   help=f"comma list of {','.join([UNTRAINED] + list(ROWS))}")
    p.add_argument("--preset", default="cpu", help="training preset the rows start from (cpu | paper)")
    p.add_argument("--train-size", type=int, default=8192, help="clips in the training split")
    p.add_argument("--eval-size", type=int, default=100, help="clips per evaluation set")
    p.add_argument("--noise-std", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers rendering training clips")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        seeds = parse_seeds(args.seed)
        if args.steps is None:
            args.steps = load_preset(args.preset)[1].steps
        if args.steps < 1 or args.batch_size < 1 or args.eval_size < 1:
            raise ValueError(f"--steps, --batch-size and --eval-size must be >= 1, got {args.steps}, "
                             f"{args.batch_size}, {args.eval_size}")
        names = [n.strip() for n in args.rows.split(",") if n.strip()]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"--rows must list distinct rows, got {args.rows!r}")
        configs = row_configs(args.preset, names)
        clip_seconds = configs[0][1].clip_seconds
        rows = []
        for seed in seeds:
            sets = evaluation_sets(clip_seconds, args.eval_size, seed)
            options = EvalOptions(tasks=("zero-shot", "noisy"), probes=(), noise_std=args.noise_std, noise_seed=seed)
            for name, config, overrides in configs:
                print(f"== seed {seed}, {name}: {overrides or 'preset defaults'}", flush=True)
                row_dir = os.path.join(args.out, *([f"seed-{seed}"] if len(seeds) > 1 else []), name)
                start = time.perf_counter()
                model, result = train_row(name, config, args, seed, row_dir)
                seconds = time.perf_counter() - start
                evaluated = run_evaluation(model, sets, options)
                rows.append({
                    "name": name, "seed": seed, "config": dataclasses.asdict(config), "train_seconds": seconds,
                    "train_steps": args.steps, "train": {k: result.get(k) for k in ("status", "step", "last")},
                    "results": {s: v["conditions"] for s, v in evaluated["sets"].items()},
                    "notes": {s: v["notes"] for s, v in evaluated["sets"].items() if v["notes"]},
                })
                del model
                # Rewritten after every row, so an interrupted ablation keeps the rows it finished.
                table = write_outputs(rows, args, complete=len(rows) == len(configs) * len(seeds),
                                      chance=1 / len(sets[0].class_names))
    except (FileNotFoundError, ValueError, TypeError, ImportError, RuntimeError) as error:
        print(f"collat.ablate: error: {error}", file=sys.stderr)
        return 1
    print("\n" + table)
    print(f"written: {os.path.join(args.out, 'ablation.md')}, ablation.json, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
