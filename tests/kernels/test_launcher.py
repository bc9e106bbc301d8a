"""kernels._utils.Launcher: the cached-handle launch path (CUDA only) must reuse a compiled kernel
exactly when Triton would pick the same specialization. The launch itself needs a GPU; the caching
logic and the specialization key are checked here against Triton's own specialization."""
import itertools

import pytest
import torch
from collat.kernels import _utils
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend


def triton_specialization(arg):
    return native_specialize_impl(BaseBackend, arg, False, True, True)


def test_the_key_separates_every_specialization_triton_makes():
    storage = torch.zeros(64)
    samples = [0, 1, 2, 15, 16, 17, 32, -1, -16, 2**31 - 1, 2**31, 2**31 + 16, -(2**31), -(2**31) - 1, 2**40, 1.5, True, None]
    samples += [storage, storage[1:], storage[4:], storage.half(), storage.half()[8:], storage.bfloat16()[3:]]
    samples += [torch.zeros(3, dtype=torch.int64), torch.zeros(5, dtype=torch.int32)[1:], torch.zeros(4, dtype=torch.bool)]
    for a, b in itertools.combinations(samples, 2):
        if _utils._arg_key(a) == _utils._arg_key(b):
            assert triton_specialization(a) == triton_specialization(b), (a, b)


class FakeCompiled:
    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("cached", grid, args))


class FakeKernel:
    arg_names = ["x", "n", "BLOCK", "FLAG"]
    __name__ = "fake_kernel"

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.calls)

        return run


def test_later_launches_reuse_the_compiled_kernel_of_their_specialization(monkeypatch):
    monkeypatch.setattr(_utils.Launcher, "cacheable", staticmethod(lambda args: True))
    kernel = FakeKernel()
    launch = _utils.Launcher(kernel)
    x = torch.zeros(64)
    launch((4,), (x, 32), dict(BLOCK=16, FLAG=True), num_warps=4)
    launch((5,), (x, 48), dict(BLOCK=16, FLAG=True), num_warps=4)  # same specialization
    assert [c[0] for c in kernel.calls] == ["jit", "cached"]
    assert kernel.calls[1] == ("cached", (5, 1, 1), (x, 48, 16, True))  # constexprs by position
    for args, constexprs, options in [
        ((x, 1), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # n == 1 is specialized
        ((x, 33), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # not a multiple of 16
        ((x[1:], 32), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # misaligned pointer
        ((x.half(), 32), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # another dtype
        ((x, 32), dict(BLOCK=32, FLAG=True), dict(num_warps=4)),  # another constexpr
        ((x, 32), dict(BLOCK=16, FLAG=True), dict(num_warps=8)),  # another launch option
    ]:
        kernel.calls.clear()
        launch((4,), args, constexprs, **options)
        launch((4,), args, constexprs, **options)
        assert [c[0] for c in kernel.calls] == ["jit", "cached"], (args, constexprs, options)


def test_constexprs_out_of_order_are_refused(monkeypatch):
    monkeypatch.setattr(_utils.Launcher, "cacheable", staticmethod(lambda args: True))
    with pytest.raises(ValueError, match=r"constexprs must be \['BLOCK', 'FLAG'\] in order"):
        _utils.Launcher(FakeKernel())((1,), (torch.zeros(4), 16), dict(FLAG=True, BLOCK=16))


def test_without_cuda_every_launch_runs_the_kernel_as_written():
    kernel = FakeKernel()
    launch = _utils.Launcher(kernel)
    for _ in range(2):
        launch((2,), (torch.zeros(4), 16), dict(BLOCK=16, FLAG=False), num_warps=4)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"] and not launch.compiled
