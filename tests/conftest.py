import contextlib
import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. It must be set before
# triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-shape model tests run with one torch thread: with 2 OpenMP threads on an oversubscribed
    2-core box every small op waits on a thread barrier (measured: a micro training step 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny untrained CoLLAT saved once per test session, for the command-line tests."""
    from collat.model import CoLLAT, CoLLATConfig

    path = tmp_path_factory.mktemp("tiny-collat")
    torch.manual_seed(0)
    config = CoLLATConfig(audio_size="tiny", interaction_depth=1, interaction_heads=4, clip_seconds=1.0, context_length=16)
    CoLLAT(config).save_pretrained(str(path))
    return path


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
    """interrupter(n) is a context in which the n-th program of the Triton interpreter raises
    KeyboardInterrupt; leaving it restores the interpreter."""
    from collat.kernels import _utils

    if not _utils.INTERPRET:
        pytest.skip("interrupts the Triton interpreter's programs")

    @contextlib.contextmanager
    def make(n=None):
        with monkeypatch.context() as patch:
            yield Interrupter(patch, n)

    return make
