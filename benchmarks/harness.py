"""Shared benchmark harness: timing, peak memory, a side-by-side table and a JSON result.

Every bench_<op>.py builds its cases, calls `measure` for each contender on the same inputs in the
same process, and hands the rows to `Report`. Ratios are always against the row named `baseline`.
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


def time_ms(fn, device: str, warmup: int = 5, iters: int = 30, min_time_s: float = 0.0) -> list[float]:
    """Per-call wall times in ms (CUDA events on GPU). Runs at least `iters` calls and `min_time_s`."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start_all = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        while len(times) < iters or time.perf_counter() - start_all < min_time_s:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        while len(times) < iters or time.perf_counter() - start_all < min_time_s:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


@dataclass
class Row:
    case: str
    impl: str
    median_ms: float
    min_ms: float
    peak_mem_mb: float
    ratio: float = float("nan")  # baseline median / this median (> 1 means faster than baseline)
    extra: dict = field(default_factory=dict)


def measure(case: str, impl: str, fn, device: str, warmup: int = 5, iters: int = 30, **extra) -> Row:
    times = time_ms(fn, device, warmup=warmup, iters=iters)
    mem = peak_memory(fn, device)
    return Row(case, impl, statistics.median(times), min(times), mem / 2**20, extra=extra)


class Report:
    def __init__(self, title: str, device: str, baseline: str):
        self.title, self.device, self.baseline = title, device, baseline
        self.rows: list[Row] = []

    def add(self, rows: list[Row]) -> None:
        base = [r for r in rows if r.impl == self.baseline]
        for r in rows:
            if base:
                r.ratio = base[0].median_ms / r.median_ms
        self.rows.extend(rows)

    def print(self) -> None:
        print(f"\n{self.title} on {device_name(self.device)} (ratio = {self.baseline} time / impl time)")
        header = f"{'case':<40} {'impl':<22} {'median':>11} {'min':>11} {'ratio':>8} {'peak MB':>9}"
        print(header)
        print("-" * len(header))
        for r in self.rows:
            print(
                f"{r.case:<40} {r.impl:<22} {_fmt(r.median_ms):>11} {_fmt(r.min_ms):>11} "
                f"{r.ratio:>7.2f}x {r.peak_mem_mb:>9.1f}"
            )

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        payload = {
            "title": self.title,
            "device": device_name(self.device),
            "torch": torch.__version__,
            "baseline": self.baseline,
            "rows": [asdict(r) for r in self.rows],
        }
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def _fmt(ms: float) -> str:
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
