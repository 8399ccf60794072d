"""Stop requests: SIGTERM (scancel, ``scontrol requeue``) and SIGUSR1 (SLURM's pre-timeout
``--signal``) ask a training run to checkpoint at the end of its current step and stop."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def stop_requests(on_request: Callable[[], None] = lambda: None) -> Iterator[threading.Event]:
    """Within the block, a stop signal sets the yielded event (and calls ``on_request``) instead of
    killing the process; the previous handlers come back afterwards."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested  # signal handlers can only be installed from the main thread
        return

    def handle(signum, _frame):
        requested.set()
        on_request()
        print(f"meta-train: got {signal.Signals(signum).name}; checkpointing and stopping", file=sys.stderr, flush=True)

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield requested
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
