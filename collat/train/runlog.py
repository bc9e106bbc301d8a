"""The run log: one JSON line per step in RUN/log.jsonl (and one per evaluation during training),
optionally the same scalars as TensorBoard event files in RUN/tensorboard, and the plot of the
losses RUN/losses.png.

Rows: {"step": k, "loss": ..., "l_ct": ..., "l_cg": ..., "l_ut": ..., "logit_scale": ..., "grad_norm":
..., "lr": ..., "samples_per_s": ...} for training step k (0-based), and {"step": k, "eval": {name:
figure}} for the zero-shot evaluation of the model after step k. A log is never deleted: a resume cuts
it back to the checkpoint's step, a fresh start in a folder that has one keeps it as log.jsonl.N.
"""
from __future__ import annotations

import json
import os

from collat.fileio import atomic_write, atomic_write_text

LOG_NAME = "log.jsonl"
PLOT_NAME = "losses.png"
TENSORBOARD_DIR = "tensorboard"
PLOTTED = ("loss", "l_ct", "l_cg", "l_ut")


def truncate_log(path: str, last_step: int) -> None:
    """Keep the rows of steps <= last_step (those a resume from step last_step + 1 does not redo)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and _step_of(line) <= last_step]
    atomic_write_text(path, "".join(keep))


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a torn last line (a crash mid-write) goes with the steps that are redone


def set_aside(path: str) -> str | None:
    """Rename an existing log to the first free PATH.N (never delete it); returns the new name."""
    if not os.path.exists(path):
        return None
    n = 1
    while os.path.exists(f"{path}.{n}"):
        n += 1
    os.replace(path, f"{path}.{n}")
    return f"{path}.{n}"


def read_log(path: str, kind: str = "steps") -> list[dict]:
    """The rows of a log: kind="steps" (training steps), "eval" (evaluations) or "all"."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if kind == "all":
        return rows
    return [row for row in rows if ("eval" in row) == (kind == "eval")]


class RunLog:
    """Rank 0's log.jsonl, and TensorBoard's event files when `report_to` asks for them."""

    def __init__(self, out: str, report_to: str, start_step: int):
        self.file = open(os.path.join(out, LOG_NAME), "a")
        self.tensorboard = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: on a resume, events of the steps that are redone are dropped, as in the JSONL log
            self.tensorboard = SummaryWriter(os.path.join(out, TENSORBOARD_DIR), purge_step=start_step)

    def write_steps(self, records: list[dict]) -> None:
        self.file.write("".join(json.dumps(record) + "\n" for record in records))
        self.file.flush()
        if self.tensorboard is not None:
            for record in records:
                for key, value in record.items():
                    if key != "step":
                        self.tensorboard.add_scalar(f"train/{key}", value, record["step"])

    def write_eval(self, step: int, table: dict) -> None:
        self.file.write(json.dumps({"step": step, "eval": table}) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for name, value in table.items():
                self.tensorboard.add_scalar(f"eval/{name}", value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plot_losses(log_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(log_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(16, 3.5))
    for ax, key in zip(axes, PLOTTED):
        ax.plot(steps, [r[key] for r in rows], lw=0.8)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(png_path, lambda p: fig.savefig(p, dpi=100, format="png"))
    plt.close(fig)
