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


def _tensor_key(t: torch.Tensor) -> tuple:
    """What Triton specializes a kernel on for a tensor argument: its dtype and 16-byte alignment
    (tests check this against Triton's own specialization)."""
    return t.dtype, t.data_ptr() % 16 == 0


class Launcher:
    """Launches one Triton kernel: `launcher(grid, args, constexprs, traced=False, **options)`.

    args are the runtime arguments in the kernel's order; constexprs (by name) must be the
    parameters that follow them, and the tensors must come first in args (all kernels here take their
    pointers first). On CUDA, the first launch with given tensor dtypes/alignments and given values of
    the other arguments goes through JITFunction.run (which compiles or finds the kernel), and later
    ones straight to that compiled kernel's launcher: JITFunction.run re-binds and re-specializes
    every argument and rebuilds its cache key on each call, which at 30-45 arguments costs more host
    time than these kernels take on the GPU. The key takes the non-tensor arguments by value (finer
    than Triton's specialization, so never wrong; a new shape costs one JITFunction.run).
    Elsewhere (the interpreter) every launch goes through the kernel as written; traced=True (inside
    a torch.library.triton_op) goes through torch.library.wrap_triton so that torch.compile sees it.
    """

    def __init__(self, kernel, writes: tuple[str, ...]):
        self.kernel = kernel
        self.writes = writes  # the pointer arguments the kernel stores to (tests check them against its code)
        self.compiled: dict = {}
        self._twin = None
        self._num_tensors: int | None = None

    def traceable(self):
        """The kernel as torch.library.wrap_triton takes it: a JITFunction. The interpreter's kernels
        are not JITFunctions, so there a JITFunction twin runs the interpreted kernel when launched."""
        if not INTERPRET:
            return self.kernel
        if self._twin is None:
            self._twin = _InterpretedJIT(self.kernel, self.writes)
        return self._twin

    @staticmethod
    def cacheable(args) -> bool:
        """Compiled kernels exist on CUDA only; the interpreter runs the Python function each time."""
        return not INTERPRET and args[0].device.type == "cuda"

    def __call__(self, grid, args, constexprs: dict, traced: bool = False, **options):
        if traced:
            from torch.library import wrap_triton

            return wrap_triton(self.traceable())[grid](*args, **constexprs, **options)
        if not self.cacheable(args):
            return self.kernel[grid](*args, **constexprs, **options)
        n = self._num_tensors
        if n is None:
            n = self._num_tensors = self._count_leading_tensors(args, constexprs)
        # A compiled kernel belongs to one device (its module is loaded there), as in Triton's own caches.
        key = (args[0].get_device(), tuple(_tensor_key(t) for t in args[:n]), args[n:],
               tuple(constexprs.values()), tuple(options.values()))
        compiled = self.compiled.get(key)
        grid = tuple(grid) + (1,) * (3 - len(grid))
        if compiled is None:
            self.compiled[key] = self.kernel[grid](*args, **constexprs, **options)
            return
        compiled[grid](*args, *constexprs.values())

    def _count_leading_tensors(self, args, constexprs) -> int:
        following = self.kernel.arg_names[len(args):]
        if list(constexprs) != following:  # the cached launch passes them by position
            raise ValueError(f"{self.kernel.__name__}: constexprs must be {following} in order, got {list(constexprs)}")
        n = next((i for i, a in enumerate(args) if not isinstance(a, torch.Tensor)), len(args))
        if any(isinstance(a, torch.Tensor) for a in args[n:]):
            raise ValueError(f"{self.kernel.__name__}: tensor arguments must come before the others")
        return n


def _interpreted_jit_class():
    from triton.runtime.jit import JITFunction

    class InterpretedJIT(JITFunction):
        """A JITFunction (what torch.library.wrap_triton accepts) whose launches run the interpreted
        kernel: lets torch.compile trace the triton_ops under TRITON_INTERPRET=1. Inductor itself
        cannot compile user Triton kernels without a GPU driver, so on CPU this serves the tracing
        backends (aot_eager) and torch.library.opcheck."""

        def __init__(self, interpreted, writes):
            super().__init__(interpreted.fn)
            self.interpreted = interpreted
            self.writes = writes

        def run(self, *args, grid, warmup, **kwargs):
            return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)

        @property
        def cache_key(self):  # JITFunction hashes its source and callees, which it cannot do for interpreted ones
            return f"interpreted:{self.fn.__module__}.{self.fn.__qualname__}"

        def __hash__(self):
            return hash(self.cache_key)

    return InterpretedJIT


def _InterpretedJIT(interpreted, writes):
    return _interpreted_jit_class()(interpreted, writes)


def _declared_writes_for_interpreted_kernels() -> None:
    """torch finds the arguments a wrapped kernel writes by lowering it to TTIR, which needs a GPU
    driver (and JIT callees); without one it assumes every tensor argument is written, and then
    functionalization rewires saved forward outputs through the backward's kernels and AOT autograd
    cannot partition the graph. The interpreter's twins declare their writes (Launcher(writes=...))."""
    from torch._higher_order_ops import triton_kernel_wrap

    analyse = triton_kernel_wrap.identify_mutated_tensors
    if getattr(analyse, "_collat_declared_writes", False):
        return

    def identify_mutated_tensors(kernel, kwargs, *rest):
        for candidate in (kernel, getattr(kernel, "fn", None)):  # torch may wrap it in an Autotuner
            if hasattr(candidate, "interpreted"):
                return [name for name in candidate.writes if isinstance(kwargs.get(name), torch.Tensor)]
        return analyse(kernel, kwargs, *rest)

    identify_mutated_tensors._collat_declared_writes = True
    triton_kernel_wrap.identify_mutated_tensors = identify_mutated_tensors


if INTERPRET:
    _declared_writes_for_interpreted_kernels()
