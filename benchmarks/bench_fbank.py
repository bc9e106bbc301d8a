"""Benchmark of the fbank front end: python benchmarks/bench_fbank.py [--quick] [--device cpu|cuda]

Side by side in one run, on the same batch of waves (B clips of S seconds at 16 kHz, fp32):
  per-clip loop  torchaudio.compliance.kaldi.fbank clip by clip, then pad/crop, stack and normalise
                 (the model's front end before it was batched): the baseline
  batched        collat.model.audio.FbankFrontEnd (one batched pass: unfold, rfft, mel matmul)
The contenders are timed in alternating rounds, so a busy machine slows both alike.
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import torchaudio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Report, Row, devices, parser, peak_memory, time_ms  # noqa: E402

from collat.model.audio import FbankFrontEnd, frames_for_seconds  # noqa: E402


def per_clip_loop(front: FbankFrontEnd):
    def run(wave: torch.Tensor) -> torch.Tensor:
        feats = []
        for w in wave:
            fb = torchaudio.compliance.kaldi.fbank(
                (w - w.mean())[None], htk_compat=True, sample_frequency=front.sample_rate, use_energy=False,
                window_type=front.window_type, num_mel_bins=front.num_mel_bins, dither=0.0, frame_shift=10)
            feats.append(front.pad_or_crop(fb))
        return (torch.stack(feats) - front.mean) / (2 * front.std)

    return run


def bench(device: str, batch: int, seconds: float, rounds: int, iters: int) -> list[Row]:
    front = FbankFrontEnd(frames_for_seconds(seconds)).to(device)
    wave = 0.3 * torch.randn(batch, int(seconds * front.sample_rate), generator=torch.Generator().manual_seed(0))
    wave = wave.to(device)
    contenders = {"per-clip loop": per_clip_loop(front), "batched": front}
    max_err = float((contenders["per-clip loop"](wave) - front(wave)).abs().max())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):  # alternate, so load from other processes hits both contenders
        for name, fn in contenders.items():
            times[name] += time_ms(lambda fn=fn: fn(wave), device, warmup=1, iters=iters)
    case = f"B={batch} x {seconds:g} s"
    fastest_loop = min(times["per-clip loop"])
    return [Row(case, name, statistics.median(t), min(t), peak_memory(lambda fn=fn: fn(wave), device) / 2**20,
                extra={"max_abs_diff_vs_loop": max_err, "calls": len(t), "ratio_of_min_times": fastest_loop / min(t)})
            for (name, t), fn in zip(times.items(), contenders.values())]


def main() -> None:
    p = parser(__doc__.splitlines()[0], "benchmarks/results/bench_fbank_cpu.json")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args()
    rounds, iters = (2, 2) if args.quick else (10, 4)
    for device in devices(args.device):
        report = Report("kaldi fbank front end (128 mels, hamming, fp32)", device, baseline="per-clip loop")
        report.add(bench(device, args.batch, args.seconds, rounds, iters))
        report.print()
        report.save(args.out if len(devices(args.device)) == 1 else args.out.replace("_cpu", f"_{device}"))


if __name__ == "__main__":
    main()
