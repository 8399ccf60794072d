"""Progress for long work: a tqdm bar on a terminal, periodic plain lines in a log.

In a terminal the bar refreshes in place. When stderr is not a terminal (CI, SLURM, ``> log``) a bar
would write a carriage-return redraw per refresh, which a log shows as hundreds of ``0%|`` lines;
``LogProgress`` writes one line with count, rate and ETA every ``interval`` seconds instead, and
nothing at all for work that ends sooner (the caller's own result lines say enough for it).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # a log line at least this often on long stages, no more often


class LogProgress:
    """The part of tqdm's interface this package uses, for a stream that is not a terminal.

    A line ``desc: n/total unit (p%), rate, elapsed, ETA, postfix`` is written at the first update
    ``interval`` seconds after the previous line (or the start), and a last one at ``close`` if any
    was written. ``clock`` is the time source (seconds; tests pass a fake one).
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, total: float | None = None, initial: float = 0, desc: str = "", unit: str = "it",
                 unit_scale: bool = False, file: TextIO | None = None, interval: float = LOG_INTERVAL_S):
        self.total, self.n, self.desc, self.unit, self.unit_scale = total, initial, desc, unit, unit_scale
        self.file = sys.stderr if file is None else file
        self.interval = interval
        self.initial = initial
        self.start = self.last = self.clock()
        self.lines = 0
        self.postfix = ""
        self.closed = False

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self._line(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={tqdm.format_num(v) if isinstance(v, (int, float)) else v}"
                                 for k, v in items.items())

    def write(self, message: str) -> None:
        self._emit(message)

    def close(self) -> None:
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
        print(text, file=self.file, flush=True)


def progress(total: float | None = None, initial: float = 0, desc: str = "", unit: str = "it",
             unit_scale: bool = False) -> tqdm | LogProgress:
    """A progress bar on stderr: tqdm on a terminal, ``LogProgress`` lines otherwise."""
    if sys.stderr.isatty():
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit_scale, file=sys.stderr,
                    dynamic_ncols=True, mininterval=0.2)
    return LogProgress(total, initial, desc, unit, unit_scale)
