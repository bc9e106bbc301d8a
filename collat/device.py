"""Which device and which precision a run uses."""
from __future__ import annotations

import contextlib

import torch

AMP_MODES = ("auto", "bf16", "none")


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" = the GPU when there is one; a CUDA device that is not there is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r} ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: CUDA is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_amp(amp: str, device: torch.device) -> str:
    """bf16 autocast pays off on GPUs and on CPUs with bf16 instructions; without them (AVX2-only CPUs)
    PyTorch emulates bf16 and a step gets slower than in fp32, so "auto" picks fp32 there."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {AMP_MODES}, got {amp!r}")
    if amp != "auto":
        return amp
    if device.type == "cuda" or cpu_has_native_bf16():
        return "bf16"
    return "none"


def autocast(device: torch.device, amp: str):
    if resolve_amp(amp, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
