"""How far greedy matching is from the optimal assignment on a trained model's real embeddings.

    python benchmarks/matching_gap.py --model runs/collat/checkpoint [--clips 256] [--metric l1]

For `--clips` validation clips of the embedded data it computes h_at (predicted tokens) and h_t (the
prompt's token embeddings), matches them greedily and optimally, and reports how often greedy's total
distance exceeds the optimum and by how much. Writes a JSON result.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from collat import ops  # noqa: E402
from collat.data.collate import collate  # noqa: E402
from collat.data.soundfont import SoundfontDataset  # noqa: E402
from collat.fileio import atomic_write_text  # noqa: E402
from collat.model import CoLLAT  # noqa: E402
from collat.ops import reference  # noqa: E402


def embeddings(model: CoLLAT, dataset, batch_size: int = 64):
    predicted, targets, lengths = [], [], []
    for start in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        with torch.no_grad():
            predicted.append(model.audio_to_text_tokens(batch["wave"]).float())
            ids, mask = model.text.tokenize(batch["text"])
            targets.append(model.text.embed(ids).float())
        lengths.append(mask.sum(dim=1))
    return torch.cat(predicted), torch.cat(targets), torch.cat(lengths)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + model.safetensors)")
    p.add_argument("--clips", type=int, default=256, help="validation clips of the embedded data")
    p.add_argument("--metric", default="l1", choices=["l1", "l2", "cosine"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/matching_gap.json")
    args = p.parse_args(argv)

    model = CoLLAT.from_pretrained(args.model).eval()
    dataset = SoundfontDataset("val", size=args.clips, seed=args.seed)
    pred, target, lengths = embeddings(model, dataset)
    greedy = ops.greedy_match(pred, target, lengths, args.metric)
    optimal = ops.optimal_match(pred, target, lengths, args.metric)
    cost_greedy = reference.assignment_cost(pred, target, greedy, args.metric)
    cost_optimal = reference.assignment_cost(pred, target, optimal, args.metric)
    excess = (cost_greedy - cost_optimal) / cost_optimal.clamp_min(1e-12)
    worse = cost_greedy > cost_optimal * (1 + 1e-6)
    result = {
        "model": args.model,
        "clips": len(dataset),
        "metric": args.metric,
        "greedy_worse_items": int(worse.sum()),
        "greedy_worse_fraction": float(worse.float().mean()),
        "mean_excess_percent": float(100 * excess.mean()),
        "max_excess_percent": float(100 * excess.max()),
        "total_excess_percent": float(100 * (cost_greedy.sum() / cost_optimal.sum() - 1)),
        "perm_differs_items": int((greedy != optimal).any(dim=1).sum()),
        "optimal_never_worse": bool((cost_optimal <= cost_greedy * (1 + 1e-6)).all()),
    }
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    atomic_write_text(args.out, json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
