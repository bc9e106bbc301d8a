"""The run log: one JSON line per step in RUN/log.jsonl, and the plot of the losses RUN/losses.png."""
from __future__ import annotations

import json
import os

from collat.fileio import atomic_write, atomic_write_text

LOG_NAME = "log.jsonl"
PLOT_NAME = "losses.png"


def truncate_log(path: str, last_step: int) -> None:
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_text(path, "".join(keep))


def read_log(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, key in zip(axes, ("loss", "l_ct", "l_cg", "l_ut")):
        ax.plot(steps, [r[key] for r in rows], lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
