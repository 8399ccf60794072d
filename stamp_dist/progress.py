"""Progress for long work: a tqdm bar on a terminal, periodic plain lines in a log.

In a terminal the bar refreshes in place. When stderr is not a terminal (CI, SLURM, ``> log``) a bar
would write a carriage-return redraw per refresh, which a log shows as hundreds of ``0%|`` lines;
``LogProgress`` writes one line with count, rate and ETA every ``interval`` seconds instead, and
nothing at all for work that ends sooner (the caller's own result lines say enough for it). A
heartbeat thread keeps the lines coming while no update arrives (a held-out evaluation between
epochs, one slow step on a starved machine), so a log never goes quiet for much longer than that.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # a log line at least this often on long stages, no more often
HEARTBEAT_S = 5.0  # how often the heartbeat checks whether a line is due (so gaps stay under ~35 s)


class LogProgress:
    """The part of tqdm's interface this package uses, for a stream that is not a terminal.

    A line ``desc: n/total unit (p%), rate, elapsed, ETA, postfix`` is due ``interval`` seconds after
    the previous line (or the start); it is written at the next update or heartbeat (every
    ``heartbeat`` seconds of real time, when given), and a last one at ``close`` if any was written.
    ``clock`` is the time source of the interval (seconds; tests pass a fake one).
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, total: float | None = None, initial: float = 0, desc: str = "", unit: str = "it",
                 unit_scale: bool = False, file: TextIO | None = None, interval: float = LOG_INTERVAL_S,
                 heartbeat: float | None = None):
        self.total, self.n, self.desc, self.unit, self.unit_scale = total, initial, desc, unit, unit_scale
        self.file = sys.stderr if file is None else file
        self.interval = interval
        self.initial = initial
        self.start = self.last = self.clock()
        self.lines = 0
        self.postfix = ""
        self.closed = False
        self._lock = threading.Lock()  # the heartbeat thread and the caller both write lines
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True, name=f"progress: {desc}")
        if heartbeat:
            self._thread.start()

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        self.tick()

    def tick(self) -> None:
        """Write a line if one is due."""
        with self._lock:
            now = self.clock()
            if not self.closed and now - self.last >= self.interval:
                self._line(now)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            self.tick()

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, (int, float)) else v}"
                                 for k, v in items.items())

    def write(self, message: str) -> None:
        with self._lock:
            self._emit(message)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            if not self.closed and self.lines:
                self._line(self.clock(), final=True)
            self.closed = True

    def _count(self, n: float) -> str:
        return tqdm.format_sizeof(n, divisor=1000) if self.unit_scale else f"{n:g}"

    def _line(self, now: float, final: bool = False) -> None:
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        done = self._count(self.n)
        parts = [f"{done}/{self._count(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
                 if self.total else f"{done} {self.unit}",
                 f"{tqdm.format_sizeof(rate, divisor=1000) if self.unit_scale else f'{rate:.3g}'} {self.unit}/s",
                 f"elapsed {tqdm.format_interval(elapsed)}"]
        if not final:
            left = (self.total - self.n) / rate if self.total and rate > 0 else None
            parts.append(f"ETA {tqdm.format_interval(left) if left is not None else '?'}")
        if self.postfix:
            parts.append(self.postfix)
        self._emit(f"{self.desc}: {'done, ' if final else ''}" + ", ".join(parts))
        self.last = now
        self.lines += 1

    def _emit(self, text: str) -> None:
        sys.stdout.flush()  # keep the order of the two streams when both go to one log file
        # A write, not print(): Ray Train patches print() in its workers and, once wandb wraps the
        # stream, prints every line twice (to the stream and through its logger).
        self.file.write(text + "\n")
        self.file.flush()


def progress(total: float | None = None, initial: float = 0, desc: str = "", unit: str = "it",
             unit_scale: bool = False) -> tqdm | LogProgress:
    """A progress bar on stderr: tqdm on a terminal, ``LogProgress`` lines otherwise."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.2)
    return LogProgress(total, initial, desc, unit, unit_scale, heartbeat=HEARTBEAT_S)
