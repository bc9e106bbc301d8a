"""The adversarial suite (every test here carries the `adversarial` marker): its one shared tool,
interrupting a call between the Triton interpreter's programs (what Ctrl-C in the middle of a launch
does)."""
import contextlib

import pytest
from collat.kernels import _utils


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/adversarial/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.adversarial)


class Interrupter:
    """Raises KeyboardInterrupt before the n-th program the Triton interpreter runs (what Ctrl-C in
    the middle of a launch does); counts the programs of a whole call when n is None."""

    def __init__(self, monkeypatch, n=None):
        from triton.runtime import interpreter

        self.n, self.programs = n, 0
        builder = interpreter.interpreter_builder
        real = builder.set_grid_idx

        def set_grid_idx(*idx):
            self.programs += 1
            if self.n is not None and self.programs == self.n:
                raise KeyboardInterrupt
            return real(*idx)

        monkeypatch.setattr(builder, "set_grid_idx", set_grid_idx)


@pytest.fixture
def interrupter(monkeypatch):
    if not _utils.INTERPRET:
        pytest.skip("interrupts the Triton interpreter's programs")

    @contextlib.contextmanager
    def make(n=None):
        with monkeypatch.context() as patch:
            yield Interrupter(patch, n)

    return make


