"""What a training run keeps in its directory besides checkpoints: the lock that makes it the only
run writing there, and ``metrics.jsonl``, which holds every finished step exactly once however often
the run is killed and resumed.

The metrics protocol: a step's line is appended (and, when a checkpoint follows, fsynced) *before*
the checkpoint of that step is saved, and a run that starts from the checkpoint of step ``s`` first
drops every line after ``s`` (and a line torn by a kill). So the log always ends at the step the
run continues from, and each step is logged once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from .atomic import atomic_file, check_writable
from .errors import StampError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(directory: str | Path, key: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (``flock`` on ``directory/.lock``, released by the kernel
    when the process dies, so a killed run never blocks the next one). A second run on the same
    directory is refused naming the holder; ``key`` is the config key that chose the directory. The
    location is probed first (``check_writable``): a file in the way or a full disk fails here.
    (``filelock`` would truncate the holder's note when the second run opens the file.)"""
    directory = Path(directory)
    check_writable(directory, key, new=False)
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / LOCK_FILE, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise StampError(f"{directory} is in use by another run ({holder}); wait for it to finish or stop it, "
                         f"or set {key} to another directory") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock


def _strict(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """``metrics.jsonl`` of a run directory: one JSON object per finished step, with a ``step`` key."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def steps(self) -> list[dict]:
        """The complete lines (a line cut short by a kill is left out)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict) and isinstance(record.get("step"), int):
                    records.append(record)
        return records

    def resume_from(self, step: int) -> None:
        """Keep the lines of steps ``1..step`` (what the checkpoint the run continues from holds), one each."""
        if not self.path.exists():
            return
        kept = {r["step"]: r for r in self.steps() if r["step"] <= step}  # the last line of a repeated step
        with atomic_file(self.path) as tmp:
            tmp.write_text("".join(json.dumps(kept[s]) + "\n" for s in sorted(kept)))

    def append(self, step: int, metrics: dict, durable: bool = False) -> None:
        """Log ``step``; ``durable`` fsyncs the line (before the checkpoint of this step is saved)."""
        line = json.dumps({"step": step, **{k: _strict(v) for k, v in metrics.items()}}, allow_nan=False)
        with open(self.path, "a") as f:
            f.write(line + "\n")
            if durable:
                f.flush()
                os.fsync(f.fileno())
