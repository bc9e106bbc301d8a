"""Plumbing shared by the Triton kernels: the interpreter switch, the SM count and the launch device.

Nothing here (or anywhere in kernels/) imports from collat: the op fronts in collat.ops sit above.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

# triton.jit picks the interpreter when a kernel is decorated, so every dispatch decision must follow
# the same snapshot of the environment, taken when this package is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_triton(device: torch.device) -> bool:
    """True where the Triton kernels run: CUDA tensors, and CPU tensors under the interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and INTERPRET)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (grids are sized from it)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: switch only when the tensors live elsewhere."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar kernel argument into a Python int with
    `int(one_element_array)`, which NumPy >= 2.4 rejects, so `range(0, N, BLOCK)` over a runtime N
    fails there. Re-patch `__index__` to go through the array's first element; idempotent."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_collat_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._collat_index_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


if INTERPRET:
    _patch_interpreter_index()
