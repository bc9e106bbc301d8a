"""Ctrl-C and SIGTERM during training: finish the step in flight, checkpoint, stop."""
from __future__ import annotations

import signal
import threading


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to checkpoint and stop after the current step."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        # The same signal twice: stop at once. Another one is not counted: a Ctrl-C under torchrun
        # reaches each worker as SIGINT from the terminal and SIGTERM from torchrun.
        if self.signal == name:
            raise KeyboardInterrupt
        self.signal = self.signal or name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
