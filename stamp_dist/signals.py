"""Stop requests: SIGTERM (scancel, ``scontrol requeue``, ``kill``), SIGUSR1 (SLURM's pre-timeout
``--signal``) and SIGINT (Ctrl-C) ask a training run to checkpoint at the end of its current step and
stop; the command then exits with ``errors.EXIT_STOPPED``. A second Ctrl-C aborts at once, without
that checkpoint (the run resumes from its last periodic one)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """A flag a signal handler sets. Deliberately no lock (not a ``threading.Event``): a second signal
    can interrupt the handler of the first in the same thread, and a lock held there deadlocks the
    process — seen in CI: SLURM repeats the stop request every 2 s."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupts = 0  # Ctrl-Cs so far

    def is_set(self) -> bool:
        return self.requested


def install(stop: StopRequest, on_request: Callable[[], None] = lambda: None) -> dict:
    """Route the stop signals to ``stop`` (from the main thread); returns the handlers they replace.
    Also used to take the signals back after a library (Ray) installed its own."""

    def handle(signum, _frame):
        if signum == signal.SIGINT:
            stop.interrupts += 1
            if stop.interrupts > 1:
                raise KeyboardInterrupt  # the user insists: stop now, without the end-of-step checkpoint
        stop.requested = True
        on_request()
        # os.write, not print: the handler can run inside a write to stderr, whose buffer lock is then held.
        again = " (Ctrl-C again to abort without it)" if signum == signal.SIGINT else ""
        os.write(2, f"got {signal.Signals(signum).name}; checkpointing at the end of this step, then stopping"
                    f"{again}\n".encode())

    return {s: signal.signal(s, handle) for s in STOP_SIGNALS}


@contextlib.contextmanager
def stop_requests(on_request: Callable[[], None] = lambda: None) -> Iterator[StopRequest]:
    """Within the block, a stop signal sets the yielded flag (and calls ``on_request``, which must be
    safe to re-enter) instead of killing the process; the previous handlers come back afterwards."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = install(stop, on_request)
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
