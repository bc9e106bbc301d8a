"""Runs the README's main command (`python -m collat.train`, no options) as a user would, times it, and
records its final table with the commit and the machine in docs/results/default_run.json (the file the
README's table is checked against by tests/test_readme.py). Usage: python scripts/default_run.py [OUT]"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str]) -> int:
    record_path = argv[0] if argv else os.path.join(ROOT, "docs", "results", "default_run.json")
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "collat.train", "--no-progress"], cwd=ROOT)
    wall = time.time() - start
    if done.returncode != 0:
        print(f"default_run: python -m collat.train exited with {done.returncode}", file=sys.stderr)
        return done.returncode
    with open(os.path.join(ROOT, "runs", "collat", "results.json")) as f:
        results = json.load(f)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    results["run"] = {"command": "python -m collat.train", "wall_seconds": round(wall, 1), "commit": commit,
                      "uncommitted_changes": dirty, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
                      "processor": _cpu_name(), "torch_threads": _torch_threads(), "date": time.strftime("%Y-%m-%d")}
    os.makedirs(os.path.dirname(record_path), exist_ok=True)
    with open(record_path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"default_run: {wall / 60:.1f} min wall; wrote {record_path}")
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
