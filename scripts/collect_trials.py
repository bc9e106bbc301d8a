"""Collects finished training runs into one trials file: per run, the options it changed from the preset,
its final table and its wall time. Usage: python scripts/collect_trials.py OUT.json "NAME=RUN_DIR" ...
(docs/results/noise_trials.json was written this way from runs of `python -m collat.train` with the options
each entry lists.)"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from collat.config import load_preset


def changed_options(results: dict) -> dict:
    model_defaults, train_defaults = (dataclasses.asdict(c) for c in load_preset("cpu"))
    changed = {}
    for saved, defaults in ((results["model_config"], model_defaults), (results["train_config"], train_defaults)):
        for key, value in saved.items():
            if key in defaults and defaults[key] != value and key not in ("out", "progress"):
                changed[key] = value
    return changed


def main(argv: list[str]) -> int:
    out, runs = argv[0], argv[1:]
    trials = []
    for item in runs:
        name, folder = item.rsplit("=", 1)
        with open(os.path.join(folder, "results.json")) as f:
            results = json.load(f)
        log = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl")) if line.strip()]
        trials.append({"name": name, "changed_from_cpu_preset": changed_options(results), "steps": results["step"],
                       "untrained": results["untrained"], "trained": results["trained"], "chance": results["chance"],
                       "last_log": log[-1] if log else None})
    with open(out, "w") as f:
        json.dump({"preset": "cpu", "trials": trials}, f, indent=2)
        f.write("\n")
    for trial in trials:
        t = trial["trained"]
        print(f"{trial['name']:28s} seen {t['seen top-1']:.3f} / noisy {t['seen top-1 noisy']:.3f}  held-out "
              f"{t['held-out top-1']:.3f}  mixture mAP {t['mixture mAP']:.3f} / noisy {t['mixture mAP noisy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
