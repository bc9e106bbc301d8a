"""Shared benchmark harness: timing, peak memory, a side-by-side table and a JSON result.

Every bench_<op>.py builds its cases, calls `measure` for each contender on the same inputs in the
same process, and hands the rows to `Report`. Each contender gets, in one run:
  wall    time per call as a user sees it: host issue included, a device sync after every call
          (median and min over the calls); on CPU the only time
  gpu     time per call with many calls issued back to back between two CUDA events and one sync
          at the end: what the GPU needs when the host keeps ahead (launch overhead hidden)
  peak    memory allocated at peak during one call, above what was allocated before it
Ratios (wall and gpu) are against the row named `baseline`: > 1 means faster than the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssSampler:
    """Peak resident-set growth during a call on CPU, sampled every 0.5 ms (approximate)."""

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while self.running:
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.base


def peak_memory(fn, device: str) -> int:
    """Bytes allocated at peak during one call of fn, above what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with _RssSampler() as sampler:
        fn()
    return sampler.growth


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wall_times_ms(fn, device: str, iters: int, min_time_s: float = 0.0) -> list[float]:
    """Per-call wall times in ms, each call followed by a device sync (host issue included)."""
    times: list[float] = []
    start_all = time.perf_counter()
    _sync(device)
    while len(times) < iters or time.perf_counter() - start_all < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def gpu_time_ms(fn, iters: int) -> float:
    """GPU time per call: `iters` calls back to back between two CUDA events, one sync at the end."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


@dataclass
class Row:
    case: str
    impl: str
    median_ms: float  # wall time per call, median (host issue included, synced after each call)
    min_ms: float  # wall time per call, min
    peak_mem_mb: float
    gpu_ms: float = float("nan")  # back-to-back calls, CUDA events, one sync (nan on CPU)
    ratio: float = float("nan")  # baseline wall median / this wall median (> 1: faster than the baseline)
    gpu_ratio: float = float("nan")  # the same for gpu_ms
    extra: dict = field(default_factory=dict)

    @property
    def wall_ms(self) -> float:
        return self.median_ms


def measure(case: str, impl: str, fn, device: str, warmup: int = 5, iters: int = 30, **extra) -> Row:
    """Wall time per call, GPU time per call (CUDA) and peak memory of fn, in that order."""
    for _ in range(warmup):
        fn()
    times = wall_times_ms(fn, device, iters)
    gpu = gpu_time_ms(fn, iters) if device.startswith("cuda") else float("nan")
    mem = peak_memory(fn, device)
    return Row(case, impl, statistics.median(times), min(times), mem / 2**20, gpu_ms=gpu, extra=extra)


class Report:
    def __init__(self, title: str, device: str, baseline: str, out: str | None = None):
        """out: a JSON path rewritten after every `add`, so that a run cut short keeps what it measured."""
        self.title, self.device, self.baseline, self.out = title, device, baseline, out
        self.rows: list[Row] = []

    def add(self, rows: list[Row]) -> None:
        """Adds rows; each gets its ratios against the baseline row of its case (added before or with it)."""
        self.rows.extend(rows)
        for r in rows:
            base = next((b for b in self.rows if b.impl == self.baseline and b.case == r.case), None)
            if base is not None:
                r.ratio = base.median_ms / r.median_ms
                r.gpu_ratio = base.gpu_ms / r.gpu_ms
        if self.out:
            self.save(self.out, quiet=True)

    def print(self) -> None:
        on_gpu = self.device.startswith("cuda")
        print(f"\n{self.title} on {device_name(self.device)} (ratio = {self.baseline} time / impl time; "
              + ("wall: host issue + sync per call; gpu: back-to-back calls)" if on_gpu else "wall time per call)"))
        header = f"{'case':<40} {'impl':<26} {'wall':>11} {'min':>11} {'ratio':>8}"
        if on_gpu:
            header += f" {'gpu':>11} {'ratio':>8}"
        header += f" {'peak MB':>9}"
        print(header)
        print("-" * len(header))
        for r in self.rows:
            line = f"{r.case:<40} {r.impl:<26} {_fmt(r.median_ms):>11} {_fmt(r.min_ms):>11} {r.ratio:>7.2f}x"
            if on_gpu:
                line += f" {_fmt(r.gpu_ms):>11} {r.gpu_ratio:>7.2f}x"
            print(line + f" {r.peak_mem_mb:>9.1f}")

    def save(self, path: str, quiet: bool = False) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {
            "title": self.title,
            "device": device_name(self.device),
            "torch": torch.__version__,
            "baseline": self.baseline,
            "columns": {
                "median_ms": "wall time per call, median: host issue included, a device sync after each call",
                "min_ms": "wall time per call, min",
                "gpu_ms": "GPU time per call: calls back to back between two CUDA events, one sync (NaN on CPU)",
                "peak_mem_mb": "memory allocated at peak during one call, above what was allocated before it",
            },
            "rows": [asdict(r) for r in self.rows],
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        if not quiet:
            print(f"wrote {path}")


def _fmt(ms: float) -> str:
    if ms != ms:
        return "-"
    return f"{ms * 1e3:.1f} us" if ms < 1 else f"{ms:.3f} ms"


def parser(description: str, default_out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default=None, help="cpu or cuda (default: every available one)")
    p.add_argument("--out", default=default_out, help="where to write the JSON result")
    p.add_argument("--quick", action="store_true", help="fewer cases and iterations (smoke run)")
    return p


def devices(arg: str | None) -> list[str]:
    if arg:
        return [arg]
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
