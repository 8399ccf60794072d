"""Stop requests: SIGTERM (scancel, ``scontrol requeue``) and SIGUSR1 (SLURM's pre-timeout
``--signal``) ask a training run to checkpoint at the end of its current step and stop."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """A flag a signal handler sets. Deliberately no lock (not a ``threading.Event``): a second signal
    can interrupt the handler of the first in the same thread, and a lock held there deadlocks the
    process — seen in CI: SLURM repeats the stop request every 2 s."""

    def __init__(self) -> None:
        self.requested = False

    def is_set(self) -> bool:
        return self.requested


@contextlib.contextmanager
def stop_requests(on_request: Callable[[], None] = lambda: None) -> Iterator[StopRequest]:
    """Within the block, a stop signal sets the yielded flag (and calls ``on_request``, which must be
    safe to re-enter) instead of killing the process; the previous handlers come back afterwards."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def handle(signum, _frame):
        stop.requested = True
        on_request()
        # os.write, not print: the handler can run inside a write to stderr, whose buffer lock is then held.
        os.write(2, f"meta-train: got {signal.Signals(signum).name}; checkpointing and stopping\n".encode())

    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
