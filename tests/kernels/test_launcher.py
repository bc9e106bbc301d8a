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


def test_the_tensor_key_separates_every_specialization_triton_makes():
    # Non-tensor arguments enter the key by value (finer than any specialization); tensors by dtype and
    # alignment, which must separate whatever Triton's own specialization separates.
    storage = torch.zeros(64)
    samples = [storage, storage[1:], storage[2:], storage[4:], storage.half(), storage.half()[8:],
               storage.half()[1:], storage.bfloat16()[3:], torch.zeros(3, dtype=torch.int64),
               torch.zeros(5, dtype=torch.int32)[1:], torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.uint8)[1:]]
    for a, b in itertools.combinations(samples, 2):
        if _utils._tensor_key(a) == _utils._tensor_key(b):
            assert triton_specialization(a) == triton_specialization(b), (a, b)
    assert len({_utils._tensor_key(t) for t in samples}) == len({triton_specialization(t) for t in samples})


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
    launch = _utils.Launcher(kernel, writes=("x",))
    x = torch.zeros(64)
    launch((4,), (x, 48), dict(BLOCK=16, FLAG=True), num_warps=4)
    launch((5,), (x, 48), dict(BLOCK=16, FLAG=True), num_warps=4)  # the same key, another grid
    assert [c[0] for c in kernel.calls] == ["jit", "cached"]
    assert kernel.calls[1] == ("cached", (5, 1, 1), (x, 48, 16, True))  # constexprs by position
    for args, constexprs, options in [
        ((x, 1), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # n == 1 is specialized
        ((x, 33), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # not a multiple of 16
        ((x, 64), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # any other value (keyed by value)
        ((x[1:], 32), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # misaligned pointer
        ((x.half(), 32), dict(BLOCK=16, FLAG=True), dict(num_warps=4)),  # another dtype
        ((x, 32), dict(BLOCK=32, FLAG=True), dict(num_warps=4)),  # another constexpr
        ((x, 32), dict(BLOCK=16, FLAG=True), dict(num_warps=8)),  # another launch option
    ]:
        kernel.calls.clear()
        launch((4,), args, constexprs, **options)
        launch((4,), args, constexprs, **options)
        assert [c[0] for c in kernel.calls] == ["jit", "cached"], (args, constexprs, options)


def test_constexprs_out_of_order_and_late_tensors_are_refused(monkeypatch):
    monkeypatch.setattr(_utils.Launcher, "cacheable", staticmethod(lambda args: True))
    with pytest.raises(ValueError, match=r"constexprs must be \['BLOCK', 'FLAG'\] in order"):
        _utils.Launcher(FakeKernel(), writes=("x",))((1,), (torch.zeros(4), 16), dict(FLAG=True, BLOCK=16))
    with pytest.raises(ValueError, match="tensor arguments must come before the others"):
        _utils.Launcher(FakeKernel(), writes=("x",))((1,), (16, torch.zeros(4)), dict(BLOCK=16, FLAG=True))


def test_without_cuda_every_launch_runs_the_kernel_as_written():
    kernel = FakeKernel()
    launch = _utils.Launcher(kernel, writes=("x",))
    for _ in range(2):
        launch((2,), (torch.zeros(4), 16), dict(BLOCK=16, FLAG=False), num_warps=4)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"] and not launch.compiled


STORING_CALLS = {"store", "atomic_add", "atomic_xchg", "atomic_cas", "atomic_max", "atomic_min", "atomic_and", "atomic_or"}


def pointers_stored_to(fn) -> set[str]:
    """Parameters of a Triton kernel that a tl.store / tl.atomic_* address derives from, following
    assignments (an over-approximation, to a fixpoint)."""
    import ast
    import inspect
    import textwrap

    function = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    roots = {arg.arg: {arg.arg} for arg in function.args.args}

    def names_in(node) -> set[str]:  # a loaded value is data, not an address: tl.load(...) is a leaf
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            return set()
        if isinstance(node, ast.Name):
            return {node.id}
        return set().union(set(), *(names_in(child) for child in ast.iter_child_nodes(node)))

    changed = True
    while changed:
        changed = False
        for node in ast.walk(function):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                found = set().union(*(roots.get(n, set()) for n in names_in(node.value)))
                name = node.targets[0].id
                if not found <= roots.get(name, set()):
                    roots[name] = roots.get(name, set()) | found
                    changed = True
    stored = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in STORING_CALLS:
            stored |= set().union(*(roots.get(n, set()) for n in names_in(node.args[0])))
    return stored


def test_declared_writes_and_constexpr_order_of_every_launch(monkeypatch):
    # torch.compile relies on Launcher.writes under the interpreter (the twin kernels declare them): an
    # undeclared write would be lost by functionalization. Every launch of the ops' paths is recorded;
    # its tensor arguments that the kernel's code stores to must be exactly the declared ones, and
    # every tensor a launch changed must be declared.
    from collat.kernels import attention, token_l1

    launches = {}
    real_call = _utils.Launcher.__call__

    def recording_call(self, grid, args, constexprs, traced=False, **options):
        # The cached CUDA launch passes the constexprs by position: they must follow args in order.
        assert list(constexprs) == self.kernel.arg_names[len(args):], self.kernel.__name__
        tensors = {name: a for name, a in zip(self.kernel.arg_names, args) if isinstance(a, torch.Tensor)}
        before = {name: t.clone() for name, t in tensors.items()}
        result = real_call(self, grid, args, constexprs, traced, **options)
        changed = {name for name, t in tensors.items() if not torch.equal(t, before[name])}
        launches.setdefault(self, [set(), set()])
        launches[self][0] |= set(tensors)
        launches[self][1] |= changed
        return result

    monkeypatch.setattr(_utils.Launcher, "__call__", recording_call)
    q, k, v = (torch.randn(2, 2, n, 16) for n in (5, 300, 300))
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[1, 100:] = True
    out, lse = attention.attention_forward(q, k, v, mask)
    grad = torch.randn_like(out)
    for mode, splits in (("fused", 3), ("split", None)):
        config = attention.LaunchConfig(64, 4, 1, num_splits=splits)
        attention.attention_backward(grad, q, k, v, out, lse, mask, config=config, mode=mode)
    pred, target = torch.randn(3, 7, 9), torch.randn(3, 7, 9)
    perm = torch.tensor([[0, 1, 2, -1, 4, 5, 6]] * 3)
    loss, grad_pred, grad_target = token_l1._launch_forward(pred, target, perm, True, True)
    token_l1._launch_backward(torch.tensor(0.5), loss, grad_pred, grad_target)
    expected = {attention._forward, attention._bwd_fused, attention._bwd_dq, attention._bwd_dkdv,
                token_l1._prepare, token_l1._forward, token_l1._backward}
    assert set(launches) == expected
    for launcher, (tensor_args, changed) in launches.items():
        name = launcher.kernel.__name__
        assert set(launcher.writes) == pointers_stored_to(launcher.kernel.fn) & tensor_args, name
        assert changed <= set(launcher.writes), (name, changed)
